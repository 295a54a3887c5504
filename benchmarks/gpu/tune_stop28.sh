# down_dx's two-blocks-an-SM tile (with MORE=1 dh's (128, 128) tiles for GPT-OSS and Mixtral) at 4096 tokens, then training
# steps at 4096 and 8192 tokens on the shipped tables plus these.
source "$(dirname "$0")/common.sh"
rm -rf build/tuned && mkdir -p build/tuned
step 120 python3 benchmarks/tune_kernels.py --shapes qwen3,olmoe --tokens 4096 --kernels down_dx --jobs 12 --verbose \
  --out build/tuned > "$OUT/tune_down_dx.txt" 2>&1
grep -v "^  " "$OUT/tune_down_dx.txt" | tail -3
if [ -n "$MORE" ]; then     # GPT-OSS's and Mixtral's dh too (~2 more minutes)
  step 150 python3 benchmarks/tune_kernels.py --shapes gptoss,mixtral --tokens 4096 --kernels dh --jobs 12 --verbose \
    --out build/tuned > "$OUT/tune_dh_more.txt" 2>&1
  grep -v "^  " "$OUT/tune_dh_more.txt" | tail -3
fi
cp build/tuned/*.json "$OUT/" 2>/dev/null; cp build/tuned/*.json "$TUNED/" 2>/dev/null
mkdir -p "$OUT/train"
step 150 python3 benchmarks/bench_layer.py --shapes qwen3,olmoe --tokens 4096,8192 --modes train --graphs \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/train"
rm -f "$OUT"/*/*.png
