"""Host time of moec's ops on a GPU (forward and the fused backward), with Triton's launches and with them replaced by
no-ops: how much of an op's host cost is the launch path (Triton's, or codegen/fast_launch.py's
by default, Triton's with --no-fast-launch) and how much moec's own Python. Qwen3-30B-A3B widths, bf16, no_grad.

Run: python benchmarks/op_host_time.py [--tokens 4096] [--no-fast-launch]
"""
import argparse

import torch

import host_overhead
from layers import SHAPES, make_params, moec_weights, tile_origins
from moec.codegen import fast_launch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--no-fast-launch", action="store_true")
    args = ap.parse_args()
    fast_launch.set_enabled(not args.no_fast_launch)
    s = SHAPES["qwen3"]
    p = make_params(s, "cuda")
    x = torch.randn(args.tokens, s.H, device="cuda", dtype=torch.bfloat16)
    logits = x @ p["router"].t()
    bases, layout = moec_weights(s, p)
    with torch.no_grad():
        w, _, offsets, src, inv = torch.ops.moec.route_plan(logits, None, s.k, "softmax", True, 1.0, 1, 1, s.E)
        _, pre = torch.ops.moec.experts_combine(x, src, offsets, inv, w, s.k, bases, layout, "silu", 0.0, 0.0, True)
        grad = torch.randn_like(x)
        needs = [True] * len(bases)
        ops = {"route_plan": lambda: torch.ops.moec.route_plan(logits, None, s.k, "softmax", True, 1.0, 1, 1, s.E),
               "experts_combine": lambda: torch.ops.moec.experts_combine(x, src, offsets, inv, w, s.k, bases, layout,
                                                                         "silu", 0.0, 0.0, False),
               "experts_combine_backward": lambda: torch.ops.moec.experts_combine_backward(
                   grad, x, src, offsets, inv, w, pre, s.k, bases, layout, "silu", 0.0, 0.0, needs),
               "torch add (reference)": lambda: x.add(1)}
        # 40 calls: the backward's ~10 launches a call stay within CUDA's launch queue (~1000 entries);
        # past it the host waits for the GPU and the timing is the GPU's (1.2 ms "host" per backward call)
        real = {name: host_overhead.enqueue_us(fn, 40, warmup=5) for name, fn in ops.items()}
        host_overhead._silence_kernels()
        silenced = {name: host_overhead.enqueue_us(fn, 40, warmup=5) for name, fn in ops.items()}
    print(f"{torch.cuda.get_device_name()}, T={args.tokens}, fast_launch={fast_launch.enabled()}")
    print(tile_origins(s, args.tokens, x.device))
    for name in ops:
        print(f"{name}: {real[name]:.0f} us host per call, {silenced[name]:.0f} us with launches skipped")


if __name__ == "__main__":
    main()
