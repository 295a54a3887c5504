# Where a compiled one-token step's host time goes by Python function (host_cprofile.py: moec eager, moec
# compiled, HF compiled on one host), then train_8192.sh's training steps.
source "$(dirname "$0")/common.sh"
step 120 python3 benchmarks/host_cprofile.py --shape qwen3 --tokens 1 > "$OUT/host_cprofile.txt" 2>&1
grep "us host per call\|host sync" "$OUT/host_cprofile.txt"
[ -n "$NO_TRAIN" ] || bash "$(dirname "$0")/train_8192.sh"
