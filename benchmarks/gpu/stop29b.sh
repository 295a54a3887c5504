# moec's weight gradients against torch._grouped_mm on the same operands (what CUTLASS would save), then the
# serving benchmark for one model (MODEL, default qwen3), CUDA-graph cells first.
source "$(dirname "$0")/common.sh"
step 120 python3 benchmarks/wgrad_vs_grouped_mm.py > "$OUT/wgrad_vs_grouped_mm.md" 2>&1; cat "$OUT/wgrad_vs_grouped_mm.md"
mkdir -p "$OUT/serving"
step 420 python3 benchmarks/bench_serving.py --models "${MODEL:-qwen3}" --variants "${VARIANTS:-moec_cg,hf_gmm_cg,moec,hf_gmm_compiled}" \
  --out "$OUT/serving"
