# The serving benchmark (issue 9) for one model (MODEL, default qwen3): moec and HF grouped_mm, with CUDA graphs
# first, each cell its own process; a cut call keeps the cells done (serving/bench_serving_cells.json).
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT/serving"
step 560 python3 benchmarks/bench_serving.py --models "${MODEL:-qwen3}" --variants "${VARIANTS:-moec_cg,hf_gmm_cg,moec,hf_gmm_compiled}" \
  --out "$OUT/serving"
