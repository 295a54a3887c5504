"""Where a decode-size MoE layer's time goes, kernel by kernel, replayed from a CUDA graph: each
kernel's duration, the gap before it (launch latency, tail of the kernel before), and the bytes of
expert weights the GEMMs stream over their duration. moec (eager ops, inference) beside HF
grouped_mm + torch.compile, one process.

    python benchmarks/decode_kernels.py --shapes qwen3,olmoe --tokens 1,8
"""
import argparse
import json
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from bench_layer import capture, make_step
from layers import SHAPES, hf_grouped_layer, make_params, moec_layer


def _kernels(graph, reps=20):
    """[(name, start us, dur us)] of the last of `reps` replays (each replay one synchronised call)."""
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
            torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    ev.sort(key=lambda e: e["ts"])
    per = len(ev) // reps
    return [(e["name"], e["ts"], e["dur"]) for e in ev[-per:]]


def _report(label, ks, weight_mb):
    t0, end = ks[0][1], max(s + d for _, s, d in ks)
    print(f"  {label}: {len(ks)} kernels, span {end - t0:.1f} us")
    prev = t0
    for name, s, d in ks:
        print(f"    {d:7.1f} us  gap {s - prev:5.1f}  {name[:90]}")
        prev = s + d
    busy = sum(d for _, _, d in ks)
    print(f"    busy {busy:.1f} us; expert weights {weight_mb:.1f} MB -> {weight_mb / (end - t0):.2f} TB/s "
          f"over the span")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe")
    ap.add_argument("--tokens", default="1,8")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    for name in args.shapes.split(","):
        s = SHAPES[name]
        p = make_params(s, "cuda")
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16)
            ids = torch.topk(x @ p["router"].t(), s.k, dim=-1).indices
            touched = torch.unique(ids).numel()
            mb = 2 * touched * 3 * s.F * s.H / 1e6
            print(f"{s.name} T={T} ({touched} experts touched)")
            _report("moec", _kernels(capture(make_step(lambda t: moec_layer(s, p, t), p, x, False))), mb)
            hf = torch.compile(lambda t: hf_grouped_layer(s, p, t))
            _report("HF compiled", _kernels(capture(make_step(hf, p, x, False))), mb)


if __name__ == "__main__":
    main()
