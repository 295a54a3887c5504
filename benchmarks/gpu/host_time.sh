# Host time: each op's enqueue cost with launches real and stubbed (one token and 4096), and where a compiled
# one-token forward's host time goes (sorted by CPU time).
source "$(dirname "$0")/common.sh"
step 60 python3 benchmarks/op_host_time.py --tokens 1
step 60 python3 benchmarks/op_host_time.py --tokens 4096
step 70 python3 benchmarks/profile_layer.py --shape qwen3 --tokens 1 --fwd --compiled --host > "$OUT/host_profile.txt" 2>&1
head -45 "$OUT/host_profile.txt"
