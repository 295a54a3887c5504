# Stop 32's third call: Qwen3's batch-8 decode step as bench_serving runs it (batch 1 first, so batch 8 replays the
# graph compiled for any batch): 1.60 ms at stop 29 against 1.28 from a graph compiled for batch 8 alone (stop32
# PART=a).
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT/dump_moec"
MOEC_DUMP=$OUT/dump_moec step 150 python3 benchmarks/decode_diag.py qwen3 moec_cg 8 --after 1 > "$OUT/decode_diag_moec_cg_after1.txt" 2>&1
tar czf "$OUT/dump_moec.tgz" -C "$OUT" dump_moec
rm -rf "$OUT/dump_moec"
step 130 python3 benchmarks/decode_diag.py qwen3 hf_gmm_cg 8 --after 1 > "$OUT/decode_diag_hf_gmm_cg_after1.txt" 2>&1
