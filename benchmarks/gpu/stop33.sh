# Stop 33: the decode cells the README's table had "not measured": GPT-OSS-20B (4 layers, 1.6 GB of experts each)
# and DeepSeek-V3 (2 layers: 22.5 GB of experts each, two fit an H100 beside the peers' buffers), as a model's
# decode step runs them (layers chained in one CUDA graph), moec vs HF grouped_mm + compile, % of the floor.
source "$(dirname "$0")/common.sh"
# PART=gptoss or PART=deepseek: one of the two (a call with little device time left)
[ "${PART:-all}" != deepseek ] && step 170 python3 benchmarks/decode_chain.py --shapes gptoss --tokens 1,8,64 --layers 4 --out "$OUT/gptoss"
[ "${PART:-all}" != gptoss ] && step 200 python3 benchmarks/decode_chain.py --shapes deepseek --tokens 1,8 --layers 2 --out "$OUT/deepseek"
