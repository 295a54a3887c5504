# Stop 35-36 (PART a comma list, run in its order; default route,decode,chain,chain_rp: ~9 minutes, within one
# call's 600 s; PART=profile in a second call).
# decode: the GEMV path's rows per program: one wave's rows (48 at one Qwen3 token) against stop 34's fixed 64, four layers a
#   graph, Qwen3 and OLMoE at one and two tokens.
# route: the decode routing: top-k by one sort against k argmax rounds, and the router GEMM in the same launch
#   (moec.router_plan), alone and in four chained layers (route_plan_ab.py).
# profile: where a training step's time goes now (CUTLASS backward GEMMs on by default), kernel by kernel, moec
#   compiled then HF grouped_mm compiled, one file per case (CASES, default Qwen3 at 8192 tokens).
# chain: the decode chain as a model runs it (moec compiled against HF grouped_mm + compile); chain_rp: the same
#   with MOEC_ROUTER_PLAN=1 (passes/fuse_router.py).
source "$(dirname "$0")/common.sh"
PART=${PART:-route,decode,chain,chain_rp}
mkdir -p "$OUT/ab" "$OUT/chain"
for part in ${PART//,/ }; do case $part in
decode) step 150 python3 benchmarks/decode_fused_ab.py --shapes ${DSHAPES:-qwen3,olmoe} --tokens 1,2 --out "$OUT/ab" ;;
route) step 150 python3 benchmarks/route_plan_ab.py --shapes ${RSHAPES:-qwen3,olmoe,gptoss} --tokens ${RTOKENS:-1,2,8} --out "$OUT/ab" ;;
profile)
  for ST in ${CASES:-qwen3:8192}; do S=${ST%:*} T=${ST#*:}
    step 100 python3 benchmarks/profile_layer.py --shape "$S" --tokens "$T" --compiled --rows 45 > "$OUT/profile_${S}_$T.txt" 2>&1
    step 80 python3 benchmarks/profile_layer.py --shape "$S" --tokens "$T" --hf --rows 45 >> "$OUT/profile_${S}_$T.txt" 2>&1
  done ;;
chain) step 150 python3 benchmarks/decode_chain.py --shapes qwen3,olmoe --tokens 1,2 --out "$OUT/chain" ;;
chain_rp) mkdir -p "$OUT/chain_rp"   # the same with passes/fuse_router.py on (moec compiled: router GEMM in route_plan's launch)
  MOEC_ROUTER_PLAN=1 step 150 python3 benchmarks/decode_chain.py --shapes qwen3,olmoe --tokens 1,2 --out "$OUT/chain_rp" ;;
esac; done
rm -f "$OUT"/*/*.png
