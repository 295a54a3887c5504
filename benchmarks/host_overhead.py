"""Host time of one MoE layer's training step through moec's ops, with every Triton launch replaced
by a no-op: what Python (checks, layouts, tile lookups, custom-op dispatch, autograd) costs per
step, the floor of a small-batch step without CUDA graphs. Runs on the CPU.

Run: python benchmarks/host_overhead.py [--profile]
"""
import argparse
import cProfile
import pstats
import time

import torch

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.codegen import compile_check, kernels
from moec.codegen import layout as layouts


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _silence_kernels():
    for mod in compile_check.kernel_modules():
        for name in dir(mod):
            if name.endswith("_kernel") and hasattr(getattr(mod, name), "run"):
                setattr(mod, name, _NoLaunch())


def enqueue_us(fn, n, warmup=0):
    """Host microseconds per call of fn on a GPU, the GPU left to run behind (the launch queue
    holds n calls without blocking): where it nears the call's GPU time, a timing measured the
    host, not the kernels."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true", help="print the 25 costliest functions")
    args = ap.parse_args()
    E, k, H, F, T = 128, 8, 64, 32, 16
    x = torch.randn(T, H, requires_grad=True)
    router = torch.randn(E, H)
    gu = torch.randn(E, 2 * F, H, requires_grad=True)
    down = torch.randn(E, H, F, requires_grad=True)
    bases, lay = layouts.pack(((gu, False, (F, 1, 2 * F)), (gu, False, (0, 1, F)), (down, False, None), None, None,
                               None))
    logits = x.detach() @ router.t()
    w0, ids = torch.ops.moec.route(logits, None, k, "softmax", True, 1.0, 1, 1)   # real routing (reference)
    offsets, src, inv = torch.ops.moec.plan(ids, E)
    _silence_kernels()

    def step():
        torch.ops.moec.route_plan(logits, None, k, "softmax", True, 1.0, 1, 1, E)    # as fuse_routing emits it
        w = w0.clone().requires_grad_()
        out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, w, k, bases, lay, "silu", 0.0, 0.0, True)
        torch.autograd.grad(out.sum(), [x, w, gu, down])

    with kernels.backend("triton"):
        for _ in range(5):
            step()
        n = 200
        start = time.perf_counter()
        for _ in range(n):
            step()
        print(f"{(time.perf_counter() - start) / n * 1e6:.0f} us of host time per training step (launches skipped)")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(50):
                step()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
