# The calls of stop 32 (stop 31's recipe, reordered: stop 31 got no card, and issue 9's decode gap comes first).
# PART=a: Qwen3's decode step at batch 8 under CUDA graphs, moec and HF grouped_mm, kernel by kernel
#         (decode_diag.py: 0.94x HF at stop 29), then the forward's GEMMs on CUTLASS against moec's fused launches
#         op by op (fwd_vs_grouped_mm.py, codegen/grouped_mm_forward.py).
# PART=b: the forward switch's tests on the card and off against on in compiled training steps (switch_ab.py).
source "$(dirname "$0")/common.sh"
if [ "${PART:-a}" = a ]; then
  mkdir -p "$OUT/dump_moec"
  MOEC_DUMP=$OUT/dump_moec step 170 python3 benchmarks/decode_diag.py qwen3 moec_cg 8 > "$OUT/decode_diag_moec_cg.txt" 2>&1
  rm -rf "$OUT/dump_moec"
  step 170 python3 benchmarks/decode_diag.py qwen3 hf_gmm_cg 8 > "$OUT/decode_diag_hf_gmm_cg.txt" 2>&1
  step 80 python3 benchmarks/fwd_vs_grouped_mm.py --shapes qwen3,mixtral,olmoe --tokens 8,4096
else
  step 90 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_grouped_mm_forward.py tests/codegen/test_grouped_mm_wgrad.py
  step 200 python3 benchmarks/switch_ab.py --switch grouped_mm_forward --shapes qwen3,mixtral --tokens 4096 --out "$OUT/fwd_ab"
  step 150 python3 benchmarks/switch_ab.py --switch grouped_mm_forward --shapes olmoe --tokens 4096 --out "$OUT/fwd_ab_b"
fi
