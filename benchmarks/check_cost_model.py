"""Does the overlap cost model predict this GPU? Calibrate, then time a few of a layer's ops whole
and in k chunks (a GEMM whose weight every chunk reads again, an elementwise op) and print
measured vs predicted per-chunk times; `moec.runtime.search` ranks chunk counts by these.

    python benchmarks/check_cost_model.py [--out results.json]

Writes the calibration, the rows, the device, versions and date as JSON (default
benchmarks/results/cost_model_<gpu>.json, or under $OUT).
"""
import argparse
import datetime
import json
import os
import re
import tempfile

import torch

from moec.runtime import load_or_calibrate
from moec.runtime.cost_model import _Stopwatch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    a = p.parse_args()
    dev = torch.device("cuda")
    cal = load_or_calibrate(dev, cache_dir=tempfile.mkdtemp(), refresh=True)
    cm = cal.compute
    print(f"{cal.key}: {cm.flops_per_s / 1e12:.0f} TFLOP/s bf16 matmul, {cm.bytes_per_s / 1e9:.0f} GB/s copy, "
          f"launch {cm.launch_s * 1e6:.2f} us")
    time_it = _Stopwatch(dev, agree=lambda n: n)
    rows = []
    for T, H, N in ((8192, 4096, 4096), (4096, 7168, 7168 * 3), (2048, 4096, 1408 * 2)):
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        w = torch.randn(H, N, device=dev, dtype=torch.bfloat16)
        op = cm.op("gemm", 2.0 * T * H * N, (T * H + H * N + T * N) * 2, H * N * 2, k_max=8)
        for k in (1, 2, 4, 8):
            xs = x.chunk(k)
            got = time_it("", 0, lambda: [xc @ w for xc in xs]) / k
            rows.append({"op": f"gemm {T}x{H}x{N}", "k": k, "measured_s": got, "predicted_s": op.chunk_s(k)})
    for T, H in ((8192, 4096), (4096, 7168)):
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        y = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        op = cm.op("add", 0, 3 * T * H * 2, k_max=8)
        for k in (1, 2, 4, 8):
            xs, ys = x.chunk(k), y.chunk(k)
            got = time_it("", 0, lambda: [xc + yc for xc, yc in zip(xs, ys)]) / k
            rows.append({"op": f"add {T}x{H}", "k": k, "measured_s": got, "predicted_s": op.chunk_s(k)})
    print(f"{'op':<24} {'k':>2} {'measured us':>12} {'predicted us':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['op']:<24} {r['k']:>2} {r['measured_s'] * 1e6:>12.1f} {r['predicted_s'] * 1e6:>13.1f} "
              f"{r['predicted_s'] / r['measured_s']:>6.2f}")
    gpu = torch.cuda.get_device_name(dev)
    out = a.out or os.path.join(os.environ.get("OUT") or "benchmarks/results",
                                f"cost_model_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).lower()}.json")
    with open(out, "w") as f:
        json.dump({"device": gpu, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                   "calibration": json.loads(cal.to_json()), "rows": rows}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
