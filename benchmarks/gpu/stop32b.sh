# Stop 32's follow-up calls (the card did not come back for them in stop 32).
# PART=1: Qwen3's batch-8 decode step as bench_serving runs it (batch 1 first, so batch 8 replays the graph Dynamo
#         compiles for any batch): bench_serving had moec at 1.60 ms (stop 29, 0.94x HF) where a graph compiled
#         for batch 8 alone runs it in 1.28 (stop 32, 1.20x HF). Kernel by kernel, moec and HF, and moec's dumps.
# PART=2: the serving table's Qwen3 rows again (moec and HF grouped_mm under CUDA graphs), to see whether 1.60 stands.
# PART=all: both in one call (PART=2's first), for a session that may get one card only.
source "$(dirname "$0")/common.sh"
if [ "${PART:-1}" = all ]; then
  step 290 python3 benchmarks/bench_serving.py --models qwen3 --variants moec_cg,hf_gmm_cg --out "$OUT/serving_qwen3"
  PART=1
fi
if [ "${PART:-1}" = 1 ]; then
  mkdir -p "$OUT/dump_moec"
  MOEC_DUMP=$OUT/dump_moec step 140 python3 benchmarks/decode_diag.py qwen3 moec_cg 8 --after 1 > "$OUT/decode_diag_moec_cg_after1.txt" 2>&1
  tar czf "$OUT/dump_moec.tgz" -C "$OUT" dump_moec
  rm -rf "$OUT/dump_moec"
  step 120 python3 benchmarks/decode_diag.py qwen3 hf_gmm_cg 8 --after 1 > "$OUT/decode_diag_hf_gmm_cg_after1.txt" 2>&1
else
  step 400 python3 benchmarks/bench_serving.py --models qwen3 --variants moec_cg,hf_gmm_cg --out "$OUT/serving_qwen3"
fi
