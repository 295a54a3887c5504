# GPT-OSS's and Mixtral's training steps on the stop-28 tables (dh's two-blocks-an-SM tiles), Mixtral's step kernel
# by kernel beside HF's, and what AOTAutograd's runtime wrapper calls in a compiled one-token step (its self time
# was that step's extra host cost on torch 2.11, 2026-12-06).
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT/train"
step 260 python3 benchmarks/bench_layer.py --shapes gptoss,mixtral --tokens 4096 --modes fwd,train --graphs \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/train"
for s in mixtral; do
  step 80 python3 benchmarks/profile_layer.py --shape $s --tokens 4096 --compiled > "$OUT/profile_moec_${s}_4096.txt" 2>&1
  step 80 python3 benchmarks/profile_layer.py --shape $s --tokens 4096 --hf > "$OUT/profile_hf_${s}_4096.txt" 2>&1
done
rm -f "$OUT"/*/*.png
step 100 python3 benchmarks/host_cprofile.py --shape qwen3 --tokens 1 --top 30 > "$OUT/host_cprofile.txt" 2>&1
