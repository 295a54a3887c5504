# Training steps at 8192 tokens, the size at which ../shared/notes/kernels.md gives SonicMoE's and HF compiled's
# steps on this H100 model (2026-11-23): moec compiled beside HF grouped_mm compiled, from CUDA graphs, one process.
# (SonicMoE itself: sonic_train.sh, whose first call on a machine compiles QuACK's GEMMs for ~10 minutes.)
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT/train"
step 430 python3 benchmarks/bench_layer.py --shapes qwen3,olmoe --tokens 8192 --modes train --graphs \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/train"
rm -f "$OUT"/*/*.png
