"""Registers, spills and shared memory of every moec kernel one training step launches, compiled on
the CPU for a GPU architecture (no GPU needed: Triton's compiler, its bundled ptxas and cuobjdump),
at the tiles the shipped table holds for a named GPU and layer, or at tiles given with --tile.
Where a kernel spills, its time on the card goes to local memory: this says so before any device
time is spent.

How: the step runs on CPU tensors with moec's Triton path, every launch intercepted (nothing runs)
and recorded with its arguments (codegen/compile_check.py); each distinct launch is compiled with
the signature and 16-divisibility Triton would specialise on, and cuobjdump reads the cubin's
resource usage. The local Triton may be newer than the card's, and the combine kernels' block
sizes are the CPU's (smaller): the numbers are indicative.

Run: python benchmarks/ptxas_report.py --shape qwen3 --tokens 4096 [--gpu "NVIDIA H100 80GB HBM3"] [--arch 90]
     [--fwd] [--tile dh=64,128,64,8,3,2 ...]
"""
import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
import moec.codegen  # noqa: E402,F401  (registers torch.ops.moec.*)
from layers import SHAPES, make_params, moec_weights  # noqa: E402
from moec.codegen import compile_check, kernels, reference, tuning  # noqa: E402
from moec.codegen.tuning import Tile  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--gpu", default="NVIDIA H100 80GB HBM3")
    ap.add_argument("--arch", type=int, default=90, help="the GPU's architecture (90: sm_90, Hopper)")
    ap.add_argument("--fwd", action="store_true", help="inference forward only")
    ap.add_argument("--tile", action="append", default=[], metavar="KERNEL=M,N,K,WARPS,STAGES[,SPLIT[,TMA[,PERSISTENT[,ROW_DESCS[,MAX_REGS]]]]]",
                    help="try this tile for a kernel (gate_up, down, dh, down_dx, wgrad, wgrad_dual), e.g. "
                         "dh=64,128,64,8,3,2: a candidate's registers and spills before it costs device time")
    args = ap.parse_args()
    s = SHAPES[args.shape]
    p = make_params(s, "cpu")
    x = torch.randn(args.tokens, s.H, dtype=torch.bfloat16, requires_grad=not args.fwd)
    with torch.no_grad():     # real routing: the backward indexes with it on the host
        w, ids = reference.route(x @ p["router"].t(), p.get("score_bias"), s.k, s.scoring, s.renormalize, 1.0,
                                 s.n_group, s.topk_group)
        offsets, src, inv = reference.plan(ids, s.E)
    bases, layout = moec_weights(s, p)
    # the tiles that GPU would be given (its table, its architecture's, the heuristic one)
    tuning.tile = lambda kernel, E, k, H, F, dtype, device, tokens: tuning.tile_on(
        kernel, E, k, H, F, dtype, args.gpu, f"sm{args.arch}", tokens)
    pins = {}
    for spec in args.tile:
        name, values = spec.split("=")
        *ints, = (int(v) for v in values.split(","))
        pins[name] = Tile(*ints[:6], *(bool(v) for v in ints[6:7]), *ints[7:8], *(bool(v) for v in ints[8:9]),
                          *ints[9:10])
    with compile_check.recording() as launches, kernels.backend("triton"), torch.set_grad_enabled(not args.fwd), \
            tuning.pin(**pins):
        w = w.requires_grad_(not args.fwd)
        out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, w, s.k, bases, layout, s.activation, 1.702,
                                                7.0, not args.fwd)
        if not args.fwd:
            torch.autograd.grad(out, [x, w] + [b for b in bases if b.requires_grad], torch.randn_like(out))
    print(f"{s.name} T={args.tokens}, tiles of {args.gpu}, sm_{args.arch}a, triton {triton.__version__}")
    print("| kernel | tile (m, n, k, warps, stages) | registers | local B / thread (spills) | shared KiB | SASS |")
    print("|---|---|---|---|---|---|")
    seen = set()
    for kernel, a, kw in launches:
        ident = compile_check.launch_id(kernel, a, kw)
        if ident in seen:
            continue
        seen.add(ident)
        compiled = compile_check.compile_launch(kernel, a, kw, args.arch)
        regs, local, shared = compile_check.usage(compiled)
        mix = " ".join(f"{op} {n}" for op, n in compile_check.sass_mix(compiled).items() if n)
        tile = tuple(kw.get(n) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
        tile += (f"split {kw['SPLIT']}",) if kw.get("SPLIT", 1) not in (1, False) else ()
        tile += (f"maxnreg {kw['maxnreg']}",) if kw.get("maxnreg") else ()
        print(f"| {kernel.__name__} | {tile} | {regs} | {local} | {shared / 1024:.0f} | {mix} |")


if __name__ == "__main__":
    main()
