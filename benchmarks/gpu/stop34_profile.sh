source benchmarks/gpu/common.sh
for v in 0 1; do echo "##### MOEC_DECODE_FUSED=$v"; MOEC_DECODE_FUSED=$v step 150 python3 benchmarks/decode_kernels.py --shapes qwen3,gptoss --tokens 1; done
