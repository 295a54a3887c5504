# Host time, all on one machine (H100 hosts differ up to 2.6x in speed between starts): each op's enqueue cost with
# launches real and stubbed (one token and 4096), the one-token layer's enqueue time for moec and HF compiled
# (bench_layer's host column), and where a compiled one-token forward's host time goes (sorted by CPU time).
source "$(dirname "$0")/common.sh"
step 60 python3 benchmarks/op_host_time.py --tokens 1
step 60 python3 benchmarks/op_host_time.py --tokens 4096
mkdir -p "$OUT/layer"
step 150 python3 benchmarks/bench_layer.py --shapes qwen3 --tokens 1 --modes fwd \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/layer"
rm -f "$OUT"/layer/*.png
step 70 python3 benchmarks/profile_layer.py --shape qwen3 --tokens 1 --fwd --compiled --host > "$OUT/host_profile.txt" 2>&1
step 70 python3 benchmarks/profile_layer.py --shape qwen3 --tokens 1 --fwd --hf --host > "$OUT/host_profile_hf.txt" 2>&1
head -45 "$OUT/host_profile.txt"
