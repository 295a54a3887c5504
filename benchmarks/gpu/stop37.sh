# Stop 37 (PART a comma list, run in its order; default profile,chain,sonic). Next: PART=sonic with .peers and
# build/quack.tgz carried (stop 37's sonic call tuned five of QuACK's GEMMs in 525 s, then ran out of time).
# profile: where a training step's time goes now, kernel by kernel, moec compiled then HF grouped_mm compiled
#   (CASES, default Qwen3 at 8192 tokens).
# sonic: SonicMoE's training step beside moec compiled's and HF grouped_mm + compile's (carry .peers, and
#   build/quack.tgz where an earlier call returned one). QuACK compiles and autotunes each GEMM on first use (~80 s
#   a GEMM on 16 cores) and a fresh machine comes with every call, so the cache travels: it is restored from
#   build/quack.tgz and returned as $OUT/quack.tgz (copy it to build/ for the next call). SONIC_ONLY=1 times
#   SonicMoE alone (a first call spends its time compiling); SONIC_S bounds the step (default 420 s).
# chain: the decode chain as a model runs it (route_plan's sort top-k now on by default), 1, 2 and 8 tokens.
source "$(dirname "$0")/common.sh"
PART=${PART:-profile,chain,sonic}
for part in ${PART//,/ }; do case $part in
profile)
  for ST in ${CASES:-qwen3:8192}; do S=${ST%:*} T=${ST#*:}
    step 100 python3 benchmarks/profile_layer.py --shape "$S" --tokens "$T" --compiled --rows 45 > "$OUT/profile_${S}_$T.txt" 2>&1
    step 80 python3 benchmarks/profile_layer.py --shape "$S" --tokens "$T" --hf --rows 45 >> "$OUT/profile_${S}_$T.txt" 2>&1
  done ;;
sonic)
  use_sonic
  mkdir -p "$QUACK_CACHE_DIR" "$OUT/sonic"
  [ -f build/quack.tgz ] && tar -xzf build/quack.tgz -C "$QUACK_CACHE_DIR" && echo "quack cache restored: $(du -sh "$QUACK_CACHE_DIR")"
  skip=hf_loop,moec_unfused,hf_grouped_mm,moec
  [ -n "$SONIC_ONLY" ] && skip=$skip,moec_compiled,hf_grouped_mm_compiled
  step ${SONIC_S:-420} python3 benchmarks/bench_layer.py --shapes qwen3 --tokens ${SONIC_T:-4096} --modes train --graphs \
    --skip $skip --out "$OUT/sonic"
  tar -czf "$OUT/quack.tgz" -C "$QUACK_CACHE_DIR" . && ls -la "$OUT/quack.tgz" ;;
chain) mkdir -p "$OUT/chain"
  step 200 python3 benchmarks/decode_chain.py --shapes qwen3,olmoe --tokens 1,2,8 --out "$OUT/chain" ;;
esac; done
rm -f "$OUT"/*/*.png
