# PART=1: the forward's GEMMs on CUTLASS against moec's fused launches (fwd_vs_grouped_mm.py), then Qwen3's
# decode step at batch 8 under CUDA graphs, moec, kernel by kernel (decode_diag.py: 0.94x HF at stop 29).
# PART=2: the same decode step for HF grouped_mm + reduce-overhead.
source "$(dirname "$0")/common.sh"
if [ "${PART:-1}" = 1 ]; then
  step 150 python3 benchmarks/fwd_vs_grouped_mm.py --shapes qwen3,olmoe,mixtral,gptoss --tokens 8,64,4096,8192
  mkdir -p "$OUT/dump_moec"
  MOEC_DUMP=$OUT/dump_moec step 300 python3 benchmarks/decode_diag.py qwen3 moec_cg 8 > "$OUT/decode_diag_moec_cg.txt" 2>&1
  rm -rf "$OUT/dump_moec"
else
  step 300 python3 benchmarks/decode_diag.py qwen3 hf_gmm_cg 8 > "$OUT/decode_diag_hf_gmm_cg.txt" 2>&1
fi
