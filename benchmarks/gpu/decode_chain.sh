# Decode as a model runs it: 4 layers of one shape in one CUDA graph (benchmarks/decode_chain.py), per-layer time
# against issue 9's floor, then the serving benchmark's CUDA-graph variants (a 4-layer Qwen3-like model).
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT/chain" "$OUT/serving"
step 300 python3 benchmarks/decode_chain.py --shapes qwen3,olmoe --tokens 1,8,64 --layers 4 --out "$OUT/chain"
rm -f "$OUT"/chain/*.png
step 260 python3 benchmarks/bench_serving.py --models qwen3 --variants moec_cg,hf_gmm_cg --out "$OUT/serving"
rm -f "$OUT"/serving/*.png
