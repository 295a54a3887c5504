"""LoRA on the experts of one MoE layer, one training step (forward + backward) of moec.experts:

    factored   W frozen, moec.experts reads W and the LoRA factors (what moec's rewrite emits)
    merged     W frozen, P = W + s * L @ R formed each step (baddbmm), moec.experts reads P and
               autograd takes L, R's gradients through the baddbmm (PEFT's own fold, fused as is)
    base       no LoRA, W frozen: the floor

Prints a table (ms per step, peak memory) and writes JSON. Shapes from layers.py; routing is a
fixed random top-k, so only the experts' work is timed.

    python benchmarks/bench_lora.py --shapes olmoe,qwen3 --tokens 4096 --rank 16 --out results/lora.json
"""
import argparse
import json
import time

import torch

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.codegen import layout, reference

from layers import SHAPES


def _params(s, r, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape, scale: (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)
    p = {"gu": rnd(s.E, 2 * s.F, s.H, scale=s.H ** -0.5), "down": rnd(s.E, s.H, s.F, scale=s.F ** -0.5)}
    for name, (n, k) in (("gu", (2 * s.F, s.H)), ("down", (s.H, s.F))):
        p[f"{name}_L"] = rnd(s.E, n, r, scale=0.1).requires_grad_()
        p[f"{name}_R"] = rnd(s.E, r, k, scale=k ** -0.5).requires_grad_()
    return p


def _specs(s, gu, down):
    up, gate = (s.F, 1, 2 * s.F), (0, 1, s.F)
    return [(gu, False, up), (gu, False, gate), (down, False, None), None, None, None]


def _step(variant, s, p, x, src, offsets, k, scale):
    if variant == "merged":
        gu = torch.baddbmm(p["gu"], p["gu_L"], p["gu_R"], alpha=scale)
        down = torch.baddbmm(p["down"], p["down_L"], p["down_R"], alpha=scale)
        bases, lay = layout.pack(_specs(s, gu, down))
    elif variant == "factored":
        up, gate = (s.F, 1, 2 * s.F), (0, 1, s.F)
        lora = [((p["gu_R"], False, None), (p["gu_L"], False, sl), scale) for sl in (up, gate)]
        lora.append(((p["down_R"], False, None), (p["down_L"], False, None), scale))
        bases, lay = layout.pack(_specs(s, p["gu"], p["down"]), lora)
    else:
        bases, lay = layout.pack(_specs(s, p["gu"], p["down"]))
    y = torch.ops.moec.experts(x, src, offsets, k, bases, lay, "silu", 0.0, 0.0)
    y.backward(torch.ones_like(y))


def bench(shape, tokens, rank, scale, device, dtype, iters):
    s = SHAPES[shape]
    p = _params(s, rank, device, dtype)
    x = torch.randn(tokens, s.H, device=device, dtype=dtype, requires_grad=True)
    ids = torch.rand(tokens, s.E, device=device).topk(s.k, dim=-1)[1]
    offsets, src, _ = reference.plan(ids, s.E)
    cuda = device == "cuda"
    rows = []
    for variant in ("base", "factored", "merged"):
        for _ in range(3):
            _step(variant, s, p, x, src, offsets, s.k, scale)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            _step(variant, s, p, x, src, offsets, s.k, scale)
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3 / iters
        rows.append(dict(shape=s.name, variant=variant, tokens=tokens, rank=rank, dtype=str(dtype)[6:], ms=ms,
                         peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="olmoe,qwen3")
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rows = []
    for shape in a.shapes.split(","):
        for tokens in map(int, a.tokens.split(",")):
            rows += bench(shape, tokens, a.rank, 2.0, "cuda", torch.bfloat16, a.iters)
    print(f"{'shape':16} {'T':>6} {'variant':9} {'ms/step':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['shape']:16} {r['tokens']:6d} {r['variant']:9} {r['ms']:8.2f} {r['peak_gib']:9.2f}")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
