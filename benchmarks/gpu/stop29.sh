# GPT-OSS's and Mixtral's training steps on the stop-28 tables (dh's two-blocks-an-SM tiles), Mixtral's step kernel
# by kernel beside HF's, and the installed torch's AOT runtime wrapper (its self time is the compiled one-token
# step's extra host cost on torch 2.11; the CPU machines run 2.13, whose wrapper is generated code).
source "$(dirname "$0")/common.sh"
python3 - > "$OUT/runtime_wrappers_src.txt" <<'PY'
import inspect, torch._functorch._aot_autograd.runtime_wrappers as r
src = inspect.getsource(r).splitlines()
print("\n".join(f"{i + 1}: {l}" for i, l in enumerate(src) if 480 <= i <= 800))
PY
mkdir -p "$OUT/train"
step 260 python3 benchmarks/bench_layer.py --shapes gptoss,mixtral --tokens 4096 --modes fwd,train --graphs \
  --skip hf_loop,moec_unfused,hf_grouped_mm --out "$OUT/train"
for s in mixtral; do
  step 80 python3 benchmarks/profile_layer.py --shape $s --tokens 4096 --compiled > "$OUT/profile_moec_${s}_4096.txt" 2>&1
  step 80 python3 benchmarks/profile_layer.py --shape $s --tokens 4096 --hf > "$OUT/profile_hf_${s}_4096.txt" 2>&1
done
rm -f "$OUT"/*/*.png
step 100 python3 benchmarks/host_cprofile.py --shape qwen3 --tokens 1 --top 30 > "$OUT/host_cprofile.txt" 2>&1
