# Stop 34: the inference forward's GEMV path (codegen/decode_experts_kernel.py) against the grouped GEMMs,
# swept over its blocks at 1-8 tokens (decode_fused_ab.py), then decode as a model runs it (decode_chain.py)
# with the default (GEMV at one token) through torch.compile(backend="moec").
# PART: a comma-separated list of ab, profile (both paths kernel by kernel), chain, deepseek (DeepSeek-V3's 2-layer
# decode chain), pdl2 (two tokens with PDL on and off), serving (bench_serving's Qwen3 rows, moec and HF with
# CUDA graphs); all = ab,chain (default)
source "$(dirname "$0")/common.sh"
PART=,${PART:-all},
PART=${PART/,all,/,ab,chain,}
case $PART in *,ab,*) step 280 python3 benchmarks/decode_fused_ab.py --shapes qwen3,olmoe,gptoss --tokens 1,2,4 \
  --sweep --out "$OUT/ab";; esac
case $PART in *,profile,*) for v in 0 1; do echo "##### MOEC_DECODE_FUSED=$v"
  MOEC_DECODE_FUSED=$v step 150 python3 benchmarks/decode_kernels.py --shapes qwen3,gptoss --tokens 1; done;; esac
case $PART in *,chain,*) step 200 python3 benchmarks/decode_chain.py --shapes qwen3,olmoe --tokens 1,2,8 --layers 4 \
  --out "$OUT/chain";; esac
case $PART in *,deepseek,*) step 290 python3 benchmarks/decode_chain.py --shapes deepseek --tokens 1,8 --layers 2 \
  --out "$OUT/deepseek";; esac
case $PART in *,pdl2,*) for v in "" 1; do echo "##### MOEC_PDL=$v"
  MOEC_PDL=$v step 120 python3 benchmarks/decode_fused_ab.py --shapes qwen3,olmoe --tokens 2 --out "$OUT/pdl2_${v:-default}"
  done;; esac
case $PART in *,serving,*) step 300 python3 benchmarks/bench_serving.py --models qwen3 --variants moec_cg,hf_gmm_cg \
  --out "$OUT/serving_qwen3";; esac
true
