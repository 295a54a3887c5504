# SonicMoE's training step beside moec's and HF's (carry .peers). Run it twice on one warm machine: the first
# call compiles QuACK's GEMMs into ~/.cache/quack (it can run out its 600 s doing only that); the second times.
source "$(dirname "$0")/common.sh"
use_sonic
mkdir -p "$OUT/sonic"
step 560 python3 benchmarks/bench_layer.py --shapes qwen3 --tokens 4096 --modes fwd,train --graphs \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/sonic"
rm -f "$OUT"/*/*.png
