# A training step kernel by kernel (TOKENS, default 4096): moec compiled and HF grouped_mm compiled.
source "$(dirname "$0")/common.sh"
T=${TOKENS:-4096}
step 100 python3 benchmarks/profile_layer.py --shape qwen3 --tokens "$T" --compiled > "$OUT/profile_moec_$T.txt" 2>&1
step 100 python3 benchmarks/profile_layer.py --shape qwen3 --tokens "$T" --hf > "$OUT/profile_hf_$T.txt" 2>&1
