"""The inference forward's GEMV path (codegen/decode_experts_kernel.py) against the grouped GEMMs it
replaces, in one process: L layers of one shape chained in one CUDA graph (decode_chain.py's model
of a decode step), moec's ops called as its passes emit them, per token count; the GEMV path over a
sweep of its (block_f, block_h, num_warps). Time per layer, % of the bandwidth floor, error against
the HF grouped_mm chain.

    python benchmarks/decode_fused_ab.py --shapes qwen3,olmoe --tokens 1,2,4,8 --out DIR

Writes decode_fused_ab.json / .md / .png into --out.
"""
import argparse
import datetime
import json
import os

import torch
import triton

from bench_layer import ceilings
from decode_chain import chain, layer_params, plot, replay_ms, touched_floor_ms, write
from layers import SHAPES, hf_grouped_layer, moec_layer, rel_err

from moec.codegen import decode_fused

# (block_f, block_h, num_warps, num_stages), or (block_f, rows_f, block_h, ...) with rows_f < block_f rows of F a
# program: the best of stop 34's first sweep (block_f 32-128, block_h 64-256, 4 or 8 warps, 3 or 4 stages;
# `results/stop34_h100/run3/`) and their neighbours, and rows that fill one wave (Qwen3: 48 at one token, 96 at
# two; lost or tied in stop 37); None: decode_fused.settings' default
SWEEP = [None, (64, 128, 4, 4), (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 4, 4), (128, 64, 4, 3), (32, 128, 4, 4),
         (64, 64, 4, 4), (64, 48, 128, 4, 4), (128, 96, 64, 4, 4)]
# without --sweep: the default (stop 34's 64 rows a program) against one wave's rows at one Qwen3 token
AGAINST_STOP34 = [None, (64, 48, 128, 4, 4)]


def one_layer_errs(s, p, x):
    """{path: error of one layer against the HF layer in float32}: a chain's error mixes in routing
    flips that a path's last-bit differences cause in later layers; one layer's does not."""
    if sum(t.numel() for t in p.values()) * 4 > 8 << 30:     # DeepSeek-V3: 45 GB in float32
        return None
    p32 = {n: t.float() for n, t in p.items()}
    with torch.no_grad():
        want = hf_grouped_layer(s, p32, x.float())
        errs = {}
        for path, n in (("grouped", 0), ("fused", decode_fused.FUSED_MAX_TOKENS)):
            decode_fused.set_max_tokens(n)
            errs[path] = rel_err(moec_layer(s, p, x), want)
    decode_fused.set_max_tokens(None)
    del p32
    return errs


def timed(fn, x, want):
    with torch.no_grad():
        err = rel_err(fn(x), want)
    return replay_ms(fn, x), err


def run(args):
    peak, bw = ceilings()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "layers": args.layers, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "copy_gbps": bw / 1e9}
    print(json.dumps(info), flush=True)
    sweep = SWEEP if args.sweep else AGAINST_STOP34
    rows = []
    for name in args.shapes.split(","):
        s = SHAPES[name]
        params = layer_params(s, args.layers)
        fn = chain(moec_layer, s, params)
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16)
            floor, want = touched_floor_ms(s, params, x, peak, bw)
            per_layer = lambda ms: ms * 1e3 / args.layers
            decode_fused.set_max_tokens(0)
            ms, err = timed(fn, x, want)
            row = {"shape": s.name, "tokens": T, "floor_us": per_layer(floor), "grouped_us": per_layer(ms),
                   "grouped_err": err, "fused": [], "one_layer_err": one_layer_errs(s, params[0], x)}
            decode_fused.set_max_tokens(decode_fused.FUSED_MAX_TOKENS)
            for cfg in sweep:
                decode_fused.set_settings(cfg)
                try:
                    ms, err = timed(fn, x, want)
                except Exception as exc:      # one setting that fails to compile or run costs only its row
                    print(f"{s.name} T={T} {cfg}: {type(exc).__name__}: {exc}"[:400], flush=True)
                    continue
                row["fused"].append({"settings": decode_fused.settings(x), "pinned": cfg,
                                     "us": per_layer(ms),
                                     "err": err})
            decode_fused.set_settings(None)
            decode_fused.set_max_tokens(None)
            if not row["fused"]:
                raise RuntimeError(f"{s.name} T={T}: every GEMV setting failed")
            best = min(row["fused"], key=lambda f: f["us"])
            row["best"] = best
            print(f"{s.name} T={T}: floor {row['floor_us']:.1f} us; grouped {row['grouped_us']:.1f} "
                  f"({row['floor_us'] / row['grouped_us']:.0%}); fused best {best['us']:.1f} "
                  f"({row['floor_us'] / best['us']:.0%}) at {best['settings']}, err {best['err']:.1e}; one layer's err "
                  f"{row['one_layer_err']}; all: " +
                  ", ".join(f"{f['settings']} {f['us']:.1f}" for f in row["fused"]), flush=True)
            rows.append(row)
        del params, fn
        torch.cuda.empty_cache()
    return info, rows


def table(rows):
    head = ("| layer | tokens | floor us | grouped us | GEMV best us | settings | GEMV vs grouped | grouped % floor | "
            "GEMV % floor |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['shape']} | {r['tokens']} | {r['floor_us']:.1f} | {r['grouped_us']:.1f} | {r['best']['us']:.1f} | "
        f"{tuple(r['best']['settings'])} | {r['grouped_us'] / r['best']['us']:.2f}x | "
        f"{r['floor_us'] / r['grouped_us']:.0%} | {r['floor_us'] / r['best']['us']:.0%} |\n" for r in rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe")
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sweep", action="store_true", help="time every SWEEP setting, not only the default")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    info, rows = run(args)
    write(args.out, "decode_fused_ab", info, rows, table(rows))
    plot(rows, info, os.path.join(args.out, "decode_fused_ab.png"),
         [("grouped GEMMs", lambda r: r["grouped_us"]), ("GEMV (best setting)", lambda r: r["best"]["us"])])


if __name__ == "__main__":
    main()
