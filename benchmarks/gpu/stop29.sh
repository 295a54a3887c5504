# Two calls on one warm machine (PART=1, then PART=2 within the idle release):
# 1: the weight gradients' row gather (aten against moec's kernel, its test on the card), Qwen3's and OLMoE's
#    training steps at 8192 tokens with it, and what AOTAutograd's runtime wrapper calls in a compiled one-token
#    step (its self time was that step's extra host cost on torch 2.11, 2026-12-06);
# 2: GPT-OSS's and Mixtral's training steps on the stop-28 tables (dh's two-blocks-an-SM tiles) and Mixtral's
#    step kernel by kernel beside HF's.
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT/train"
if [ "${PART:-1}" = 1 ]; then
  step 60 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_gather_rows.py
  step 90 python3 benchmarks/gather_ab.py > "$OUT/gather_ab.md" 2>&1; cat "$OUT/gather_ab.md"
  step 240 python3 benchmarks/bench_layer.py --shapes qwen3,olmoe --tokens 8192 --modes train --graphs \
    --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/train"
  step 100 python3 benchmarks/host_cprofile.py --shape qwen3 --tokens 1 --top 30 > "$OUT/host_cprofile.txt" 2>&1
else
  step 300 python3 benchmarks/bench_layer.py --shapes gptoss,mixtral --tokens 4096 --modes fwd,train --graphs \
    --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/train"
  step 120 python3 benchmarks/profile_layer.py --shape mixtral --tokens 4096 --compiled > "$OUT/profile_moec_mixtral_4096.txt" 2>&1
  step 120 python3 benchmarks/profile_layer.py --shape mixtral --tokens 4096 --hf > "$OUT/profile_hf_mixtral_4096.txt" 2>&1
fi
rm -f "$OUT"/*/*.png
