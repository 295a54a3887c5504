# dW_down through torch._grouped_mm: its test on the card (CUTLASS's kernel, experts with no rows, a dropped copy),
# then Mixtral's training step with it (MOEC_GROUPED_MM_WGRAD=1; OFF=1 runs it off first) beside HF compiled.
source "$(dirname "$0")/common.sh"
step 60 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_grouped_mm_wgrad.py tests/codegen/test_gather_rows.py
for on in ${OFF:+0} 1; do
  mkdir -p "$OUT/train_gmm$on"
  export MOEC_GROUPED_MM_WGRAD=$on
  step 110 python3 benchmarks/bench_layer.py --shapes mixtral --tokens 4096 \
    --modes train --graphs --skip hf_loop,moec_unfused,hf_grouped_mm,moec --out "$OUT/train_gmm$on"
done
rm -f "$OUT"/*/*.png
