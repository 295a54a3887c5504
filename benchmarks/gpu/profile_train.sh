# Qwen3's training step at 4096 tokens kernel by kernel: moec compiled and HF grouped_mm compiled.
source "$(dirname "$0")/common.sh"
step 70 python3 benchmarks/profile_layer.py --shape qwen3 --tokens 4096 --compiled > "$OUT/profile_moec.txt" 2>&1
step 70 python3 benchmarks/profile_layer.py --shape qwen3 --tokens 4096 --hf > "$OUT/profile_hf.txt" 2>&1
