"""Where one MoE layer's time goes: CUDA kernel times of a moec train step under torch.profiler
(--hf: the peer's, HF grouped_mm under the default torch.compile, kernel by kernel beside moec's).

Run: python benchmarks/profile_layer.py --shape olmoe --tokens 4096 [--compiled] [--host] [--hf]
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import moec.codegen  # noqa: E402,F401
from bench_layer import moec_compiled  # noqa: E402
from layers import SHAPES, hf_grouped_layer, make_params, moec_layer  # noqa: E402
from moec.codegen import wgrad_kernel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="olmoe")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--fwd", action="store_true", help="forward only, under no_grad (decode)")
    ap.add_argument("--compiled", action="store_true",
                    help="the HF-style layer under torch.compile(backend='moec'), as users run it (bench_layer's "
                         "moec_compiled); with --host, where its host time goes")
    ap.add_argument("--host", action="store_true", help="sort by CPU time (the host's share of a step)")
    ap.add_argument("--hf", action="store_true", help="profile HF grouped_mm under torch.compile instead")
    ap.add_argument("--rows", type=int, default=25, help="rows of the profiler's table")
    ap.add_argument("--wgrad-copy-mib", type=int, default=None,
                    help="chunk size of the weight gradients' gathered copies (wgrad_kernel.MAX_COPY_BYTES)")
    args = ap.parse_args()
    if args.wgrad_copy_mib is not None:
        wgrad_kernel.MAX_COPY_BYTES = args.wgrad_copy_mib << 20
    s = SHAPES[args.shape]
    p = make_params(s, "cuda")
    x = torch.randn(args.tokens, s.H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    leaves = [x] + [t for t in p.values() if t.requires_grad]
    layer = moec_compiled(s, p) if args.compiled else (lambda x: moec_layer(s, p, x))
    if args.hf:
        layer = torch.compile(lambda x: hf_grouped_layer(s, p, x))

    def step():
        if args.fwd:
            with torch.no_grad():
                return layer(x)
        out = layer(x)
        torch.autograd.grad(out.float().square().sum(), leaves)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"{'HF grouped_mm compiled: ' if args.hf else ''}{s.name} T={args.tokens} "
          f"{'forward' if args.fwd else 'train'} step, per-kernel CUDA time summed over 5 steps"
          f" (wgrad copies of <= {wgrad_kernel.copy_mib() or 'any'} MiB)")
    print(prof.key_averages().table(sort_by="cpu_time_total" if args.host else "cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=60))


if __name__ == "__main__":
    main()
