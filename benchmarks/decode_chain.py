"""Decode as a model runs it: L MoE layers of one shape (own random weights each), applied one after
another with a residual (x <- x + layer(x)), captured in one CUDA graph and replayed; time per layer.

Why beside bench_layer.py's one-layer replays: there, every replay of a ~50 us decode layer pays the
graph's own launch (~10 us of a one-token Qwen3 replay against a 43 us kernel span in
decode_kernels.py), which a model's decode graph pays once for all its layers; and in a chain each
layer's experts are evicted by the other layers' before its next step, as in a model. The floor is
issue 9's: per layer, the bytes of the expert weights its routing touched (counted from each layer's
own input), the router's weights and the activations, over the measured copy bandwidth.

    python benchmarks/decode_chain.py --shapes qwen3,olmoe --tokens 1,8,64 --layers 4 [--out DIR]

Methods: moec (its ops called as moec's passes emit them), moec compiled (`torch.compile(chain,
backend="moec")`: one Dynamo graph holding all L layers) and HF grouped_mm + torch.compile, each
forward under no_grad. Writes decode_chain.json / .md / .png into --out.
"""
import argparse
import datetime
import json
import os
import platform

import torch
import triton
import triton.testing

from torch._dynamo.utils import counters

from bench_layer import capture, ceilings, floor_ms
from layers import SHAPES, _route, hf_grouped_layer, make_params, moec_layer, rel_err, tile_origins


def chain(layer, s, params):
    """fn(x) -> x after every layer, each layer's output added to its input (a residual stream)."""
    def fn(x):
        for p in params:
            x = x + layer(s, p, x)
        return x
    return fn


def touched_floor_ms(s, params, x, peak, bw):
    """(sum over the chain of each layer's decode floor (bench_layer.floor_ms), its routing taken on
    the input that layer sees, the reference chain's output): one pass for both."""
    total = 0.0
    with torch.no_grad():
        for p in params:
            _, ids = _route(s, p, x)
            total += floor_ms(s, x.shape[0], ids, peak, bw, train=False)[0]
            x = x + hf_grouped_layer(s, p, x)
    return total, x


def methods(s, params):
    return {"moec": chain(moec_layer, s, params), "moec_compiled": fused_chain(s, params),
            "hf_grouped_mm_compiled": torch.compile(chain(hf_grouped_layer, s, params))}


def fused_chain(s, params):
    """The HF-style chain under torch.compile(backend="moec"); refuses to time it unless every
    layer was fused on its first compile."""
    fn = torch.compile(chain(hf_grouped_layer, s, params), backend="moec")

    def run(x):
        before = counters["moec"]["regions_fused"]
        out = fn(x)
        if not run.checked:
            fused = counters["moec"]["regions_fused"] - before
            if fused != len(params):
                raise RuntimeError(f"moec fused {fused} of {len(params)} layers (see TORCH_LOGS=+moec)")
            run.checked = True
        return out
    run.checked = False
    return run


def layer_params(s, layers):
    """`layers` layers' parameters of shape s on the GPU, each its own draw, no autograd."""
    return [{n: t.detach() for n, t in make_params(s, "cuda", seed=i).items()} for i in range(layers)]


def replay_ms(fn, x):
    def step():
        with torch.no_grad():
            fn(x)
    return triton.testing.do_bench(capture(step).replay, warmup=10, rep=60, return_mode="median")


def run(args):
    peak, bw = ceilings()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "layers": args.layers,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "copy_gbps": bw / 1e9}
    print(json.dumps(info), flush=True)
    rows = []
    for name in args.shapes.split(","):
        s = SHAPES[name]
        params = layer_params(s, args.layers)
        fns = methods(s, params)
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16)
            floor, want = touched_floor_ms(s, params, x, peak, bw)
            with torch.no_grad():
                errs = {m: rel_err(fn(x), want) for m, fn in fns.items()}
            row = {"shape": s.name, "tokens": T, "layers": args.layers, "floor_us": floor * 1e3 / args.layers,
                   "tiles": tile_origins(s, T, x.device), **{f"{m}_rel_err": e for m, e in errs.items()}}
            for m, fn in fns.items():
                row[f"{m}_us"] = replay_ms(fn, x) * 1e3 / args.layers
            rows.append(row)
            print(_line(row), flush=True)
        del params, fns
        torch.cuda.empty_cache()
    return info, rows


def _line(r):
    return (f"{r['shape']} T={r['tokens']}: floor {r['floor_us']:.1f} us a layer; " +
            "; ".join(f"{m} {r[f'{m}_us']:.1f} us ({r['floor_us'] / r[f'{m}_us']:.0%} of floor, "
                      f"err {r[f'{m}_rel_err']:.1e})" for m in METHODS))


METHODS = ("moec", "moec_compiled", "hf_grouped_mm_compiled")


def table(rows):
    head = ("| layer | tokens | floor us / layer | moec us | moec compiled us | HF grouped_mm + compile us | "
            "moec compiled vs HF compiled | moec compiled % of floor | HF compiled % of floor |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['shape']} | {r['tokens']} | {r['floor_us']:.1f} | {r['moec_us']:.1f} | {r['moec_compiled_us']:.1f} | "
        f"{r['hf_grouped_mm_compiled_us']:.1f} | {r['hf_grouped_mm_compiled_us'] / r['moec_compiled_us']:.2f}x | "
        f"{r['floor_us'] / r['moec_compiled_us']:.0%} | {r['floor_us'] / r['hf_grouped_mm_compiled_us']:.0%} |\n"
        for r in rows)


def plot(rows, info, path, series=None):
    """Per shape, us per layer against tokens. series: [(label, row -> us)], the floor dashed first;
    default: the floor and every METHODS row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = series or [(m, lambda r, m=m: r[f"{m}_us"]) for m in METHODS]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = [r for r in rows if r["shape"] == shape]
        for label, us in [("floor", lambda r: r["floor_us"])] + series:
            ax.plot([r["tokens"] for r in sel], [us(r) for r in sel], marker="o", label=label,
                    linestyle="--" if label == "floor" else "-")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape}, {info['layers']} layers in one graph")
        ax.set_xlabel("tokens")
        ax.set_ylabel("us per layer")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe")
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    info, rows = run(args)
    write(args.out, "decode_chain", info, rows, table(rows))
    plot(rows, info, os.path.join(args.out, "decode_chain.png"))


def write(out, name, info, rows, md_table):
    """<out>/<name>.json (info and rows) and <name>.md (a header line of info, then the table); prints the md."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    md = (f"device: {info['device']}; torch {info['torch']}; triton {info['triton']}; {info['date']}; "
          f"{info['layers']} layers a graph; copy {info['copy_gbps']:.0f} GB/s\n\n" + md_table)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
