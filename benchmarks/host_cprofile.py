"""Where a one-token decode step's host time goes, by Python function (cProfile), for moec's ops
called eagerly, the same layer under torch.compile(backend="moec"), and HF grouped_mm under
torch.compile, on one host: the enqueue time per call of each (no profiler), then each one's
costliest functions. torch.profiler's view (profile_layer.py --host) shows ops, not the Python
between them. Qwen3-30B-A3B widths, bf16, no_grad.

Run: python benchmarks/host_cprofile.py [--shape qwen3] [--tokens 1] [--top 22] [--callees runtime_wrapper]
"""
import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import moec_compiled  # noqa: E402
from host_overhead import enqueue_us  # noqa: E402
from layers import SHAPES, hf_grouped_layer, make_params, moec_layer, tile_origins  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--callees", default="runtime_wrapper",
                    help="also list what functions of this name call, and their times")
    args = ap.parse_args()
    s = SHAPES[args.shape]
    p = make_params(s, "cuda")
    x = torch.randn(args.tokens, s.H, device="cuda", dtype=torch.bfloat16)
    ways = {"moec": lambda x: moec_layer(s, p, x), "moec_compiled": moec_compiled(s, p),
            "hf_grouped_mm_compiled": torch.compile(lambda x: hf_grouped_layer(s, p, x))}
    with torch.no_grad():
        for name, fn in ways.items():
            print(f"{name}: {enqueue_us(lambda: fn(x), 200, warmup=20):.0f} us host per call")
        print(tile_origins(s, args.tokens, x.device))     # after the compiles: what they loaded counts
        for name, fn in ways.items():     # a host sync in a step makes its enqueue time the GPU's
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn(x)
                print(f"{name}: no host sync")
            except RuntimeError as e:
                print(f"{name}: syncs with the host: {str(e).splitlines()[0]}")
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for name, fn in ways.items():
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                fn(x)
            prof.disable()
            torch.cuda.synchronize()
            for order in ("tottime", "cumulative"):
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats(order).print_stats(args.top)
                print(f"\n===== {name} (200 calls, by {order})\n" + out.getvalue())
            if args.callees:
                out = io.StringIO()
                pstats.Stats(prof, stream=out).print_callees(args.callees)
                print(f"\n===== {name}: what {args.callees} calls\n" + out.getvalue())


if __name__ == "__main__":
    main()
