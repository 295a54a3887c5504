"""The weight gradients on a second stream (codegen/streams.py) against one stream: a moec
training step (forward + backward, bf16) per layer shape, the two settings alternated three
times so clock drift does not pick the winner, with each setting's peak memory.
Run: python benchmarks/wgrad_stream_ab.py --shapes qwen3,olmoe,gptoss,mixtral --tokens 4096
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import bench  # noqa: E402
from layers import SHAPES, make_params, moec_layer  # noqa: E402
from moec.codegen import streams  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe,gptoss,mixtral")
    ap.add_argument("--tokens", default="4096")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for name in args.shapes.split(","):
        s = SHAPES[name]
        p = make_params(s, "cuda")
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            fn = lambda x: moec_layer(s, p, x)      # noqa: E731
            got = {False: [], True: []}
            for _ in range(3):
                for on in (False, True):
                    streams.set_wgrad_stream(on)
                    got[on].append(bench(fn, p, x, True))
            line = " | ".join(f"{'two streams' if on else 'one stream'} {min(m for m, _ in r):.3f} ms "
                              f"(runs {', '.join(f'{m:.3f}' for m, _ in r)}) peak {max(k for _, k in r):.0f} MiB"
                              for on, r in got.items())
            print(f"{s.name} T={T}: {line}", flush=True)
            streams.set_wgrad_stream(False)


if __name__ == "__main__":
    main()
