"""The weight gradients' gathered copy (S = T*k rows of x or grad_out, token s // k for copy s):
aten (`index_select` after the division, what moec ran through stop 28) against moec's
`gather_rows` at a few block settings, bf16, with the bytes moved over the measured time
(S x H written, T x H read). Routing as the layer makes it (`moec.plan`).

Run: python benchmarks/gather_ab.py [--shapes qwen3,olmoe,mixtral,gptoss] [--tokens 4096,8192]
"""
import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from layers import SHAPES  # noqa: E402
from moec.codegen.gather_kernel import gather_rows  # noqa: E402

SETTINGS = [(None, None, None), (8, 512, 4), (16, 512, 8), (32, 256, 8), (4, 1024, 4)]   # (rows, cols, warps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe,mixtral,gptoss")
    ap.add_argument("--tokens", default="4096,8192")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| layer | tokens | aten us (TB/s) | " + " | ".join(f"moec {s} us" for s in SETTINGS) + " |")
    print("|---|---|---|" + "---|" * len(SETTINGS))
    for name in args.shapes.split(","):
        s = SHAPES[name]
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16)
            _, src, _ = torch.ops.moec.plan(torch.randn(T, s.E, device="cuda").topk(s.k, dim=1).indices, s.E)
            want = x.index_select(0, torch.div(src, s.k, rounding_mode="floor"))
            gb = (src.numel() + T) * s.H * x.element_size() / 1e9
            aten = triton.testing.do_bench(lambda: x.index_select(0, torch.div(src, s.k, rounding_mode="floor")))
            cells = [f"{aten * 1e3:.0f} ({gb / aten:.2f})"]
            for r, h, w in SETTINGS:
                assert torch.equal(gather_rows(x, src, s.k, r, h, w), want)
                ms = triton.testing.do_bench(lambda: gather_rows(x, src, s.k, r, h, w))
                cells.append(f"{ms * 1e3:.0f} ({gb / ms:.2f})")
            print(f"| {s.name} | {T} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
