# dh's (128, 128) tiles (epilogue in quarters, 128 registers a thread) against the shipped ones; the
# backward as three ops (pre freed before any weight gradient); training steps at 8192 tokens before
# and after the dh tuning, the step kernel by kernel, and a one-token step's host time.
source "$(dirname "$0")/common.sh"
step 240 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_experts_combine.py \
  tests/codegen/test_backward_split.py tests/codegen/test_backward_peak.py tests/codegen/test_tuning_lookup.py
mkdir -p "$OUT/before" "$OUT/after"
step 200 python3 benchmarks/bench_layer.py --shapes qwen3,olmoe --tokens 8192 --modes train --graphs \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/before"
rm -rf build/tuned && mkdir -p build/tuned
step 200 python3 benchmarks/tune_kernels.py --shapes qwen3,olmoe --tokens 4096 --kernels dh --jobs 12 --verbose \
  --out build/tuned > "$OUT/tune_dh.txt" 2>&1
grep -v "^  " "$OUT/tune_dh.txt" | tail -5; cp build/tuned/*.json "$OUT/" 2>/dev/null
cp build/tuned/*.json "$TUNED/" 2>/dev/null
step 200 python3 benchmarks/bench_layer.py --shapes qwen3,olmoe --tokens 8192 --modes train --graphs \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/after"
step 100 python3 benchmarks/profile_layer.py --shape qwen3 --tokens 8192 --compiled > "$OUT/profile_moec_8192.txt" 2>&1
step 100 python3 benchmarks/profile_layer.py --shape qwen3 --tokens 8192 --hf > "$OUT/profile_hf_8192.txt" 2>&1
step 120 python3 benchmarks/host_cprofile.py --shape qwen3 --tokens 1 > "$OUT/host_cprofile.txt" 2>&1
grep "us host per call\|host sync" "$OUT/host_cprofile.txt"
rm -f "$OUT"/*/*.png
