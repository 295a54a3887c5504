# A training step kernel by kernel (SHAPE, default qwen3; TOKENS, default 4096): moec compiled and HF grouped_mm compiled.
source "$(dirname "$0")/common.sh"
T=${TOKENS:-4096} S=${SHAPE:-qwen3}
step 100 python3 benchmarks/profile_layer.py --shape "$S" --tokens "$T" --compiled > "$OUT/profile_moec_${S}_$T.txt" 2>&1
step 100 python3 benchmarks/profile_layer.py --shape "$S" --tokens "$T" --hf > "$OUT/profile_hf_${S}_$T.txt" 2>&1
