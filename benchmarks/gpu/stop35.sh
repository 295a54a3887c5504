# Stop 35 (PART a comma list). PART=profile: where a training step's time goes now (CUTLASS backward GEMMs on by default), kernel by
# kernel, moec compiled and HF grouped_mm compiled (CASES, default Qwen3 at 4096 and 8192 tokens, OLMoE at 8192).
# PART=decode: the GEMV path's rows per program (decode_fused.rows_per_program) against stop 34's fixed 64, four
# layers a graph, Qwen3 and OLMoE at one and two tokens; then the decode chain as a model runs it.
source "$(dirname "$0")/common.sh"
for part in ${PART//,/ }; do case $part in
profile)
  for ST in ${CASES:-qwen3:4096 qwen3:8192 olmoe:8192}; do S=${ST%:*} T=${ST#*:}
    step 120 python3 benchmarks/profile_layer.py --shape "$S" --tokens "$T" --compiled --rows 45 > "$OUT/profile_moec_${S}_$T.txt" 2>&1
    step 120 python3 benchmarks/profile_layer.py --shape "$S" --tokens "$T" --hf --rows 45 > "$OUT/profile_hf_${S}_$T.txt" 2>&1
  done ;;
decode)
  mkdir -p "$OUT/ab" "$OUT/chain"
  step 240 python3 benchmarks/decode_fused_ab.py --shapes qwen3,olmoe --tokens 1,2 --out "$OUT/ab"
  step 240 python3 benchmarks/decode_chain.py --shapes qwen3,olmoe --tokens 1,2 --out "$OUT/chain"
  rm -f "$OUT"/*/*.png ;;
esac; done
