# PART=1: the forward's GEMMs on CUTLASS against moec's fused launches (fwd_vs_grouped_mm.py), the forward's down
# on CUTLASS in compiled training steps (switch_ab.py), then Qwen3's decode step at batch 8 under CUDA graphs,
# moec, kernel by kernel (decode_diag.py: 0.94x HF at stop 29).
# PART=2: the same decode step for HF grouped_mm + reduce-overhead; the switch on the other layers.
source "$(dirname "$0")/common.sh"
if [ "${PART:-1}" = 1 ]; then
  step 120 python3 benchmarks/fwd_vs_grouped_mm.py --shapes qwen3,olmoe,mixtral,gptoss --tokens 8,64,4096,8192
  step 60 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_grouped_mm_forward.py
  step 150 python3 benchmarks/switch_ab.py --switch grouped_mm_forward --shapes mixtral,qwen3 --tokens 4096 --out "$OUT/fwd_ab"
  mkdir -p "$OUT/dump_moec"
  MOEC_DUMP=$OUT/dump_moec step 200 python3 benchmarks/decode_diag.py qwen3 moec_cg 8 > "$OUT/decode_diag_moec_cg.txt" 2>&1
  rm -rf "$OUT/dump_moec"
else
  step 200 python3 benchmarks/decode_diag.py qwen3 hf_gmm_cg 8 > "$OUT/decode_diag_hf_gmm_cg.txt" 2>&1
  step 250 python3 benchmarks/switch_ab.py --switch grouped_mm_forward --shapes olmoe,gptoss --tokens 4096,8192 --out "$OUT/fwd_ab_b"
fi
