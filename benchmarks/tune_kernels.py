"""Tune the grouped-GEMM launch settings per (layer, token bucket) on this GPU and show where
the layer's time goes. Writes the tuned table as JSON into moec's cache (<cache_dir>/tuning, by
default ~/.cache/moec/tuning; MOEC_CACHE_DIR), where every later compile on this machine reads it
(codegen.tuning.load_dir), or into --out. A layer of your own: --shape E,k,H,F.

Run: python benchmarks/tune_kernels.py --shapes olmoe,qwen3 --tokens 256,4096,16384 [--out DIR] [--jobs 12]

--jobs N: first run every candidate once in N processes, so that Triton compiles them in parallel
into its cache (one core each; serially, compiling was most of a tuning run's time), then time them
in this process as before.
"""
import argparse
import dataclasses
import json
import os
import re
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(__file__))
import moec.codegen  # noqa: E402,F401
from moec.codegen import tuning  # noqa: E402
from moec.codegen.combine_kernel import combine_launch  # noqa: E402
from moec.codegen.dh_kernel import launch_dh  # noqa: E402
from moec.codegen.down_kernel import launch_down  # noqa: E402
from moec.codegen.gate_up_kernel import launch_gate_up  # noqa: E402
from moec.codegen.jit_helpers import ACTIVATION_CODE  # noqa: E402
from moec.codegen.tuning import Tile  # noqa: E402
from moec.codegen.wgrad_kernel import launch_wgrad  # noqa: E402
from layers import ALPHA, LIMIT, SHAPES, Shape, make_params, split  # noqa: E402
from moec.config import Config  # noqa: E402
from moec.runtime.cost_model import cache_root  # noqa: E402

T_ = Tile
CANDIDATES = {
    "gate_up": [T_(64, 64, 64, 4, 3), T_(128, 64, 64, 8, 3), T_(128, 128, 64, 8, 3), T_(64, 128, 64, 4, 3),
                T_(128, 64, 64, 4, 4), T_(16, 64, 128, 4, 3), T_(32, 64, 128, 4, 3), T_(16, 128, 128, 4, 3),
                T_(64, 64, 128, 4, 3), T_(128, 128, 64, 8, 4),
                # decode: one or a few rows per expert, so narrower tiles make enough programs to
                # stream the touched experts' weights on every SM
                T_(16, 32, 128, 4, 3), T_(16, 32, 256, 4, 3), T_(16, 32, 128, 2, 4), T_(16, 64, 256, 4, 3),
                T_(16, 16, 256, 2, 3),
                # one token: 8 experts x F / 32 = 192 programs on 132 SMs left a second, part-filled wave
                # (Qwen3 gate/up at 2.7 TB/s against 4.0 at 8 tokens, H200 decode_kernels.py); F / 16
                # makes ~3 waves
                T_(16, 16, 128, 2, 4), T_(16, 16, 128, 1, 4), T_(16, 16, 64, 1, 6),
                # deeper pipelines (more weight bytes in flight per one-row program): no gain on the H100
                # at one token, L2-cold, where every reasonable tile lands within 3% (ramp and tail bound)
                T_(16, 32, 128, 4, 6), T_(16, 32, 256, 4, 4), T_(16, 64, 128, 4, 5), T_(16, 16, 256, 2, 6)],
    "down": [T_(128, 128, 64, 8, 3), T_(128, 64, 64, 4, 3), T_(64, 128, 64, 4, 3), T_(128, 256, 64, 8, 3),
             T_(64, 64, 64, 4, 4), T_(16, 64, 128, 4, 3), T_(32, 128, 64, 4, 3), T_(16, 128, 128, 4, 3),
             T_(128, 128, 64, 8, 4), T_(16, 32, 128, 4, 3), T_(16, 64, 256, 4, 3), T_(16, 32, 256, 4, 3),
             T_(16, 128, 64, 4, 4),
             # one token: H / 128 x 8 experts = 128 programs, under one wave on 132 SMs (Qwen3 down at
             # 2.6 TB/s, H200): narrower tiles for two to four waves
             T_(16, 64, 128, 2, 4), T_(16, 32, 128, 2, 4), T_(16, 64, 64, 2, 6),
             T_(16, 64, 128, 4, 6), T_(16, 32, 256, 4, 5), T_(16, 128, 128, 4, 5), T_(16, 64, 256, 4, 4)],
    "down_dx": [T_(128, 128, 64, 8, 3), T_(128, 64, 64, 4, 3), T_(64, 128, 64, 4, 3), T_(128, 128, 32, 8, 4),
                T_(64, 64, 64, 4, 4), T_(16, 64, 64, 4, 3), T_(32, 128, 64, 4, 3),
                # two A/B pairs a stage: 96 KB of shared memory at three stages, two blocks an SM (124 registers)
                T_(128, 128, 32, 8, 3)],
    "dh": [T_(128, 128, 64, 8, 3, 2), T_(64, 128, 64, 4, 3, 2), T_(128, 64, 64, 8, 3, 2), T_(64, 64, 64, 4, 4, 2),
           T_(128, 128, 64, 8, 3), T_(128, 64, 64, 8, 3), T_(64, 64, 64, 4, 3), T_(128, 64, 64, 4, 3),
           T_(64, 128, 64, 4, 3), T_(128, 64, 64, 8, 4),
           T_(64, 64, 64, 4, 4), T_(16, 64, 128, 4, 3), T_(32, 64, 128, 4, 3), T_(128, 128, 64, 8, 4),
           # GPT-OSS's epilogue (clamped SwiGLU, biases) spills at (64, 128, 64, 4, 3, 2), not at these
           # (benchmarks/ptxas_report.py: 200 B per thread against none)
           T_(64, 128, 64, 8, 3, 2), T_(64, 64, 64, 4, 3, 2),
           # (128, 128) tiles read 1.5x fewer operand bytes a FLOP than (64, 128) (dh is L2-bound there: 0.43 ms
           # for Qwen3's 103 GFLOP at 4096 tokens); epilogue in quarters and 128 registers a thread fit two
           # blocks an SM, one's epilogue under the other's MMAs (ptxas_report: 16 B of spills, triton 3.6)
           T_(128, 128, 64, 8, 3, 4, max_regs=128), T_(128, 128, 64, 8, 4, 4, max_regs=128),
           T_(128, 128, 32, 8, 4, 4, max_regs=128), T_(128, 128, 64, 8, 3, 4)],
    "gate_up_bwd": [T_(64, 64, 64, 4, 2), T_(64, 64, 32, 4, 3), T_(128, 64, 64, 8, 2), T_(64, 128, 32, 8, 3),
                    T_(32, 64, 64, 4, 3), T_(16, 64, 64, 4, 2), T_(128, 64, 32, 8, 3), T_(128, 128, 32, 8, 2)],
    "wgrad": [T_(128, 128, 32, 8, 3), T_(128, 128, 64, 8, 3), T_(128, 256, 32, 8, 3), T_(64, 128, 64, 4, 3),
              T_(128, 64, 64, 4, 3), T_(64, 64, 32, 4, 3), T_(256, 128, 32, 8, 3),
              # with TMA twins: fewer, larger tiles over the short per-expert K (no spills, ptxas_report)
              T_(128, 256, 64, 8, 3), T_(128, 128, 64, 8, 4),
              # four warps: ~110 K registers a block less, two blocks an SM (ptxas_report: 224 a thread)
              T_(128, 128, 64, 4, 3), T_(64, 256, 64, 8, 3)],
    "wgrad_dual": [T_(128, 64, 32, 8, 3), T_(128, 128, 32, 8, 3), T_(64, 128, 64, 8, 3), T_(128, 64, 64, 8, 3),
                   T_(64, 64, 64, 4, 3), T_(128, 128, 64, 8, 2), T_(128, 128, 64, 8, 3), T_(64, 128, 64, 8, 4),
                   # two accumulators in four warps: 214 / 189 registers a thread, two blocks an SM,
                   # one's epilogue under the other's MMAs (eight warps fit one block an SM)
                   T_(64, 128, 64, 4, 3), T_(64, 128, 32, 4, 4)],
}
# kernels whose weight tiles (wgrad: operand row blocks) can come through TMA descriptors (Tile.tma; sm90+)
READS_WEIGHTS = ("gate_up", "down", "down_dx", "dh", "gate_up_bwd", "wgrad", "wgrad_dual")
# kernels with a persistent twin (Tile.persistent programs per SM over every tile; with Tile.tma
# their outputs stored through TMA, their operands read through pointers)
PERSISTENT = ("wgrad", "wgrad_dual")
# kernels that can read their grouped rows through descriptors made per expert (Tile.row_descs)
ROW_DESCS = ("wgrad", "wgrad_dual", "down", "down_dx")


def candidates(kind, default, tma, only=None):
    """The kernel's candidates, the current choice first (so tuning never records a slower tile),
    each also with TMA weight tiles where the kernel has them and `tma` is on, persistent (one and
    two programs per SM, stores through pointers or TMA) and with row descriptors where the kernel
    has those. only="persistent" / "rowdesc": the current choice and those twins alone (shorter runs)."""
    base = [default] + [c for c in CANDIDATES[kind] if c != default]
    twins = []
    if tma and kind in READS_WEIGHTS:
        twins += [dataclasses.replace(c, tma=True, persistent=0) for c in base]
    if kind in PERSISTENT:      # persistent with TMA: its tiles stored through descriptors
        twins += [dataclasses.replace(c, tma=t, persistent=n) for t in (False, True) for n in (1, 2) for c in base]
    if tma and kind in ROW_DESCS:      # operand rows through descriptors made per expert, weights either way
        twins += [dataclasses.replace(c, row_descs=True, tma=t) for c in base
                  for t in ((False, True) if kind in ("down", "down_dx") else (False,))]
    twins = [t for i, t in enumerate(twins) if t not in base and t not in twins[:i]]
    if only == "persistent":
        return [default] + [t for t in twins if t.persistent and t != default]
    if only == "rowdesc":
        return [default] + [t for t in twins if t.row_descs and t != default]
    return base + twins


def lazy_params(s, device="cuda"):
    """() -> the layer's weights, made on the first call (only kernels that read weights call it)."""
    params = {}

    def get():
        if not params:
            params.update({n: t.detach() for n, t in make_params(s, device).items()})
        return params
    return get


def kernels_for(s, p, T, device="cuda"):
    """{kernel: fn(tile)} over random inputs at layer s and T tokens. Each input is made on its first
    use, and p() (the weights, `lazy_params`) only by the kernels that take weights, so a --jobs child warming
    one kernel holds just that kernel's tensors (DeepSeek-V3 widths: 22 GB of weights, as much again
    of weight gradients)."""
    made = {}
    new = lambda *shape: torch.randn(*shape, device=device, dtype=torch.bfloat16)      # noqa: E731
    S, F, H, act = T * s.k, s.F, s.H, ACTIVATION_CODE[s.activation]
    makers = {
        "x": lambda: new(T, H), "h": lambda: new(S, F), "dg": lambda: new(S, F), "du": lambda: new(S, F),
        "gy": lambda: new(S, H), "rows": lambda: new(S, H), "pre": lambda: new(S, 2 * F), "go": lambda: new(T, H),
        "logits": lambda: torch.randn(T, s.E, device=device),
        "routed": lambda: torch.ops.moec.route(v("logits"), None, s.k, "softmax", True, 1.0, 1, 1),
        "plan": lambda: torch.ops.moec.plan(v("routed")[1], s.E),
        "dw_gu": lambda: [torch.empty(s.E, F, H, device=device, dtype=torch.bfloat16) for _ in range(2)],
        "dw_d": lambda: torch.empty(s.E, H, F, device=device, dtype=torch.bfloat16),
        "split": lambda: split(s, p()), "d": lambda: p()["down"].detach(),
    }

    def v(name):
        if name not in made:
            made[name] = makers[name]()
        return made[name]
    w = lambda: v("routed")[0]          # noqa: E731
    ids = lambda: v("routed")[1]        # noqa: E731
    offsets, src, inv = (lambda: v("plan")[0]), (lambda: v("plan")[1]), (lambda: v("plan")[2])
    up = lambda: v("split")             # noqa: E731  (w_up, w_gate, b_up, b_gate)
    b_down = lambda: p().get("b_down")  # noqa: E731

    def after(_launch, *names):
        """The tensors a launch (the argument, run first) wrote: tuning checks them against the
        current tile's."""
        return [t for n in names for t in (v(n) if isinstance(v(n), list) else [v(n)])]
    return {
        "route": lambda t: torch.ops.moec.route(v("logits"), None, s.k, "softmax", True, 1.0, 1, 1),
        "plan": lambda t: torch.ops.moec.plan(ids(), s.E),
        "gate_up": lambda t: after(launch_gate_up(v("x"), src(), offsets(), s.k, *up(), act, ALPHA, LIMIT, t,
                                                  v("h")), "h"),
        "down": lambda t: after(launch_down(v("h"), v("d").transpose(1, 2), v("rows"), offsets(), t,
                                            bias=b_down()), "rows"),
        "combine": lambda t: [combine_launch(v("rows"), inv(), w(), torch.empty_like(v("x")), s.k)],
        "gate_up_bwd": lambda t: after(launch_gate_up(v("x"), src(), offsets(), s.k, *up(), act, ALPHA, LIMIT, t,
                                                      v("h"), grad_y=v("gy"), w_down=v("d"), dg=v("dg"),
                                                      du=v("du")), "h", "dg", "du"),
        "dh": lambda t: after(launch_dh(v("go"), src(), offsets(), s.k, v("d"), b_down(), v("pre"), w(), act, ALPHA,
                                        LIMIT, t, v("h"), v("dg"), v("du")), "h", "dg", "du"),
        "down_dx": lambda t: after(launch_down(v("du"), up()[0], v("rows"), offsets(), t, a2=v("dg"), b2=up()[1]),
                                   "rows"),
        "wgrad_dual": lambda t: after(launch_wgrad(v("du"), v("x"), offsets(), v("dw_gu")[0], t, src=src(), k=s.k,
                                                   a2=v("dg"), out2=v("dw_gu")[1]), "dw_gu"),
        "wgrad": lambda t: after(launch_wgrad(v("go"), v("h"), offsets(), v("dw_d"), t, k=s.k,
                                              gather_a=(src(), w())), "dw_d"),
    }


def _warm(task):
    """Run each candidate of one kernel once (a child of --jobs): Triton compiles it into its cache."""
    shape, T, name, tma, only = task
    s = SHAPES[shape] if isinstance(shape, str) else shape
    fn = kernels_for(s, lazy_params(s), T)[name]
    default = tuning.tile(name, s.E, s.k, s.H, s.F, torch.bfloat16, torch.device("cuda"), T)
    failed = 0
    for cand in candidates(name, default, tma, only):
        try:
            fn(cand)
        except Exception:     # one that does not fit: the timing pass skips it too
            failed += 1
    torch.cuda.synchronize()
    return failed


def warm_cache(shapes, tokens, names, tma, jobs, only=None):
    import multiprocessing
    tasks = [(shape, T, name, tma, only) for shape in shapes for T in tokens for name in names
             if name in CANDIDATES]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        pool.map(_warm, tasks, chunksize=1)


def rotations(s, T, dev):
    """How many input sets a timing cycles through, so that the expert weights each launch streams
    miss the L2 as they do in a model (the other layers evict them between a layer's steps): at
    decode sizes one set's touched weights fit the L2 (Qwen3's down projection at one token, 25 MB
    of an H100's 50 MB), and replaying it timed on-chip reads (6.5 us, 3.9 TB/s, against 11.5 us in
    the layer, 2026-12-06)."""
    one_projection = min(s.E, T * s.k) * s.H * s.F * 2
    return max(1, min(16, -(-4 * torch.cuda.get_device_properties(dev).L2_cache_size // one_projection)))


def rotating(fns):
    """run(tile): a kernel's launch on each input set in turn; the tensors every launch wrote
    (tuning compares them all between candidates)."""
    if len(fns) == 1:
        return fns[0]

    def run(tile):
        out = []
        for fn in fns:
            got = fn(tile)
            out += got if isinstance(got, list) else []
        return out
    return run


def _report(name):
    def report(cand, ms):
        settings = ",".join(str(v) for v in dataclasses.astuple(cand))
        print(f"    {name} {settings}: " + (f"{ms * 1e3:.1f} us" if ms is not None else "refused / does not fit"))
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", help="layers of benchmarks/layers.py (default olmoe,qwen3 without --shape)")
    ap.add_argument("--tokens", default="256,4096,16384")
    ap.add_argument("--shape", action="append", default=[], help="E,k,H,F of a SwiGLU layer of your own")
    ap.add_argument("--out", help="folder for the table (default: moec's cache, read by every compile)")
    ap.add_argument("--kernels", help="only these kernels (comma-separated names of kernels_for), e.g. gate_up,down")
    ap.add_argument("--no-tma", action="store_true", help="leave out the TMA twin of each candidate (Tile.tma)")
    ap.add_argument("--persistent-only", action="store_const", const="persistent", dest="only",
                    help="weight gradients: try only the persistent twins against the current choice")
    ap.add_argument("--rowdesc-only", action="store_const", const="rowdesc", dest="only",
                    help="weight gradients: try only the row-descriptor twins against the current choice")
    ap.add_argument("--jobs", type=int, default=1, help="processes compiling the candidates first")
    ap.add_argument("--graphs", action="store_true",
                    help="time replays of a CUDA graph (decode sizes: GPU time without the host's launch cost)")
    ap.add_argument("--verbose", action="store_true", help="print every candidate's time, not only the best")
    args = ap.parse_args()

    def bench(fn):
        if args.graphs:
            return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")

    dev = torch.device("cuda")
    out = args.out or str(cache_root(Config.from_options().cache_dir) / "tuning")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"tuned_{re.sub(r'[^A-Za-z0-9]+', '_', torch.cuda.get_device_name(dev)).lower()}.json")
    mine = set(json.load(open(path))) if os.path.exists(path) else set()   # add to what earlier runs tuned here
    tuning.load(path)
    own = [Shape(f"E{e}k{k}H{h}F{f}", *map(int, (e, k, h, f))) for e, k, h, f in (x.split(",") for x in args.shape)]
    named = args.shapes if args.shapes is not None else ("" if own else "olmoe,qwen3")
    if args.jobs > 1:
        names = args.kernels.split(",") if args.kernels else list(CANDIDATES)
        warm_cache([key for key in named.split(",") if key] + own, [int(t) for t in args.tokens.split(",")], names,
                   not args.no_tma, args.jobs, args.only)
    for s in [SHAPES[key] for key in named.split(",") if key] + own:
        p = lazy_params(s)
        layer = (s.E, s.k, s.H, s.F)
        for T in [int(t) for t in args.tokens.split(",")]:
            sets = [kernels_for(s, p, T) for _ in range(rotations(s, T, dev))]
            fns = {n: rotating([fns[n] for fns in sets]) for n in sets[0]
                   if not args.kernels or n in args.kernels.split(",")}
            per_launch = lambda fn: bench(fn) / len(sets)     # noqa: E731
            line, total_default, total_best = [], 0.0, 0.0
            for name, fn in fns.items():
                kind = name
                default = tuning.tile(kind, *layer, torch.bfloat16, dev, T) if kind in CANDIDATES else None
                ms_default = per_launch(lambda: fn(default))
                ms_best = ms_default
                if kind in CANDIDATES:
                    best, ms_best = tuning.tune(kind, layer, torch.bfloat16, dev, T, fn,
                                                candidates(kind, default, not args.no_tma, args.only),
                                                bench=per_launch, report=_report(name) if args.verbose else None)
                    mine.add(tuning.key(kind, *layer, torch.bfloat16, dev, T))
                    line.append(f"{name} {ms_default:.3f}->{ms_best:.3f} {tuple(best.__dict__.values())}")
                else:
                    line.append(f"{name} {ms_default:.3f}")
                total_default += ms_default
                total_best += min(ms_best, ms_default)
            print(f"{s.name} T={T} ({len(sets)} input sets): sum default {total_default:.3f} ms, "
                  f"tuned {total_best:.3f} ms | " + "; ".join(line), flush=True)
            tuning.save(path, keys=mine)
    print(f"tuned launch settings saved to {path}")


if __name__ == "__main__":
    main()
