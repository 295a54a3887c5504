# PART=short: the tests and the A/B on Mixtral and Qwen3 only. PART=1: the backward's CUTLASS GEMMs (grouped_mm_wgrad.py) on the card: their tests, then off against on in one
# process per layer (switch_ab.py: a CUDA graph per setting, replays alternated), all of them and dW_down alone.
# PART=2: Qwen3's decode step at batch 8 under CUDA graphs, moec against HF grouped_mm, kernel by kernel
# (decode_diag.py), where moec's model step is 0.94x HF's (stop 29).
source "$(dirname "$0")/common.sh"
if [ "${PART:-1}" = short ]; then      # the tests and the A/B on two layers, for a call with little time
  step 90 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_grouped_mm_wgrad.py
  step 300 python3 benchmarks/switch_ab.py --switch grouped_mm --shapes mixtral,qwen3 --tokens 4096 --out "$OUT/gmm_all"
elif [ "${PART:-1}" = 1 ]; then
  step 90 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_grouped_mm_wgrad.py tests/codegen/test_gather_rows.py
  step 200 python3 benchmarks/switch_ab.py --switch grouped_mm --shapes mixtral,gptoss --tokens 4096 --out "$OUT/gmm_all_a"
  step 200 python3 benchmarks/switch_ab.py --switch grouped_mm --shapes qwen3,olmoe --tokens 4096,8192 --out "$OUT/gmm_all_b"
  step 100 python3 benchmarks/switch_ab.py --switch grouped_mm_down --shapes mixtral,qwen3 --tokens 4096 --out "$OUT/gmm_down"
else
  mkdir -p "$OUT/dump_moec"
  for v in moec_cg hf_gmm_cg; do
    MOEC_DUMP=$OUT/dump_moec step 280 python3 benchmarks/decode_diag.py qwen3 $v 8 > "$OUT/decode_diag_$v.txt" 2>&1
  done
  rm -rf "$OUT/dump_moec"
fi
