# The headline tables with the tables tuned so far: decode (one and eight tokens) and training at 4096, both
# replayed from CUDA graphs too, then a decode step kernel by kernel.
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT/dec" "$OUT/train"
step 200 python3 benchmarks/bench_layer.py --shapes qwen3,olmoe --tokens 1,8 --modes fwd --graphs \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/dec"
step 280 python3 benchmarks/bench_layer.py --shapes qwen3,olmoe --tokens 4096 --modes train --graphs \
  --skip hf_loop,moec_unfused --out "$OUT/train"
rm -f "$OUT"/*/*.png      # eight files come back at most: plot here with benchmarks/plot_layer.py
step 80 python3 benchmarks/decode_kernels.py --shapes qwen3,olmoe --tokens 1
