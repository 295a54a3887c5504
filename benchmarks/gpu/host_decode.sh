# The host's share of one-token decode without CUDA graphs, and decode as a model runs it, in one call: the
# dispatch shortcut and the launches' None pointers checked on the card (the kernels' tests), each op's enqueue
# cost (launches real and stubbed), the one-token layer's enqueue time for moec and HF compiled on this same host
# (bench_layer's host column), and decode_chain.py.
source "$(dirname "$0")/common.sh"
step 200 python3 -m pytest -q -x -p no:cacheprovider tests/codegen/test_dispatch.py tests/codegen/test_kernels.py \
  tests/codegen/test_experts_combine.py tests/codegen/test_route_plan.py
step 60 python3 benchmarks/op_host_time.py --tokens 1
mkdir -p "$OUT/layer" "$OUT/chain"
step 150 python3 benchmarks/bench_layer.py --shapes qwen3 --tokens 1 --modes fwd \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/layer"
step 240 python3 benchmarks/decode_chain.py --shapes qwen3,olmoe --tokens 1,8,64 --layers 4 --out "$OUT/chain"
rm -f "$OUT"/*/*.png
