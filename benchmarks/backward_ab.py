"""A/B of a training step's backward choices on one GPU, in one process: the fused backward as one op or
three (`experts_combine_op.SPLIT_BACKWARD`; three let a compiled backward free pre before any weight
gradient) x the weight-gradient tiles as tuned or with the persistent twin off
(`Tile.persistent`). For each: GPU time of the step replayed from a CUDA graph, and its peak memory, for
the eager ops (`moec`) and the layer under torch.compile(backend="moec") (`moec compiled`), beside HF
grouped_mm + torch.compile.

Run: python benchmarks/backward_ab.py [--shape qwen3] [--tokens 4096]
"""
import argparse
import dataclasses

import torch

import bench_layer
from layers import SHAPES, hf_grouped_layer, make_params, moec_layer
from moec.codegen import experts_combine_op, tuning


def _tiles_without_persistent(s, T):
    dev = torch.device("cuda")
    return {n: dataclasses.replace(tuning.tile(n, s.E, s.k, s.H, s.F, torch.bfloat16, dev, T), persistent=0)
            for n in ("wgrad", "wgrad_dual")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    s, T = SHAPES[args.shape], args.tokens
    params = make_params(s, "cuda")
    x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.config.cache_size_limit = 64

    def measure(fn):
        step = bench_layer.make_step(fn, params, x, True)
        return bench_layer.bench_graph(step), bench_layer.peak_mib(step)

    hf = torch.compile(lambda t: hf_grouped_layer(s, params, t))
    ms, mib = measure(hf)
    print(f"{s.name} T={T} train, {torch.cuda.get_device_name()}: HF grouped_mm compiled {ms:.3f} ms, {mib:.0f} MiB")
    for split in (True, False):
        for persistent in (True, False):
            experts_combine_op.SPLIT_BACKWARD = split
            torch._dynamo.reset()
            with tuning.pin(**({} if persistent else _tiles_without_persistent(s, T))):
                eager = measure(lambda t: moec_layer(s, params, t))
                compiled = measure(bench_layer.moec_compiled(s, params))
            how = f"backward {'split' if split else 'one op'}, wgrad {'as tuned' if persistent else 'per tile'}"
            print(f"  {how}: moec {eager[0]:.3f} ms {eager[1]:.0f} MiB | moec compiled {compiled[0]:.3f} ms "
                  f"{compiled[1]:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
