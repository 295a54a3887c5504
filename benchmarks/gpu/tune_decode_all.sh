# Decode tiles for every shipped layer at 1, 8 and 64 tokens, L2-cold (the tables tuned before the tuner rotated
# its input sets timed L2 hits at one token), then the decode table. Run on an H100 and an H200 to re-pick both
# shipped tables; each call returns its table in $OUT.
source "$(dirname "$0")/common.sh"
step 330 python3 benchmarks/tune_kernels.py --shapes qwen3,olmoe,mixtral,gptoss --tokens 1,8,64 --kernels gate_up,down \
  --graphs --jobs 14 --verbose > "$OUT/tune.txt" 2>&1
grep "input sets" "$OUT/tune.txt"
save_tuned
mkdir -p "$OUT/dec"
step 220 python3 benchmarks/bench_layer.py --shapes qwen3,olmoe,mixtral,gptoss --tokens 1,8,64 --modes fwd --graphs \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/dec"
rm -f "$OUT"/*/*.png
