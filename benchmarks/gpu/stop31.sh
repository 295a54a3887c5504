# PART=1: the forward's GEMMs on CUTLASS (codegen/grouped_mm_forward.py): against moec's fused launches op by op
# (fwd_vs_grouped_mm.py), the tests on the card, off against on in compiled training steps (switch_ab.py).
# PART=2: Qwen3's decode step at batch 8 under CUDA graphs, moec and HF grouped_mm, kernel by kernel
# (decode_diag.py: 0.94x HF at stop 29); the forward switch on OLMoE.
# PART=min: the op-level comparison, the tests and one layer's A/B, for a call with little device time left.
source "$(dirname "$0")/common.sh"
if [ "${PART:-1}" = min ]; then
  step 60 python3 benchmarks/fwd_vs_grouped_mm.py --shapes qwen3,mixtral --tokens 8,4096
  step 60 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_grouped_mm_forward.py
  step 150 python3 benchmarks/switch_ab.py --switch grouped_mm_forward --shapes qwen3 --tokens 4096 --out "$OUT/fwd_ab"
elif [ "${PART:-1}" = 1 ]; then
  step 80 python3 benchmarks/fwd_vs_grouped_mm.py --shapes qwen3,mixtral,olmoe --tokens 8,4096
  step 90 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_grouped_mm_forward.py tests/codegen/test_grouped_mm_wgrad.py
  step 200 python3 benchmarks/switch_ab.py --switch grouped_mm_forward --shapes qwen3,mixtral --tokens 4096 --out "$OUT/fwd_ab"
else
  mkdir -p "$OUT/dump_moec"
  MOEC_DUMP=$OUT/dump_moec step 170 python3 benchmarks/decode_diag.py qwen3 moec_cg 8 > "$OUT/decode_diag_moec_cg.txt" 2>&1
  rm -rf "$OUT/dump_moec"
  step 170 python3 benchmarks/decode_diag.py qwen3 hf_gmm_cg 8 > "$OUT/decode_diag_hf_gmm_cg.txt" 2>&1
  step 180 python3 benchmarks/switch_ab.py --switch grouped_mm_forward --shapes olmoe --tokens 4096,8192 --out "$OUT/fwd_ab_b"
fi
