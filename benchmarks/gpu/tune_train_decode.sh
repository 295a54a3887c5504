# Card tests of the row descriptors; tune the row-descriptor twins at 4096 tokens (training) and the decode
# tiles at one and eight tokens (L2-cold, every candidate's time in $OUT/tune.txt); the tables land in $OUT.
source "$(dirname "$0")/common.sh"
step 110 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_row_descs.py
step 150 python3 benchmarks/tune_kernels.py --shapes qwen3,olmoe --tokens 4096 --kernels wgrad,wgrad_dual,down,down_dx \
  --rowdesc-only --jobs 12
save_tuned
step 240 python3 benchmarks/tune_kernels.py --shapes qwen3,olmoe --tokens 1,8 --kernels gate_up,down --graphs --jobs 14 \
  --verbose > "$OUT/tune.txt" 2>&1
grep "input sets" "$OUT/tune.txt"
save_tuned
