"""The router's logits through moec.router (codegen/router_kernel.py at decode sizes) against torch's
linear (cuBLAS), in one process: L layers of one shape chained in one CUDA graph as decode_chain.py
chains them (moec's ops as its passes emit them), per token count, the router kernel over a few
(block_e, block_h, num_warps, num_stages); and the router alone (L routers' GEMVs in one graph).

    python benchmarks/router_ab.py --shapes qwen3,olmoe,gptoss,mixtral --tokens 1,2,8 --out DIR

Writes router_ab.json / .md into --out.
"""
import argparse
import datetime
import json
import os

import torch
import triton

from bench_layer import ceilings
from decode_chain import chain, replay_ms, touched_floor_ms
from layers import SHAPES, make_params, moec_layer, rel_err

from moec.codegen import router_op

SETTINGS = [(16, 256, 4, 4), (16, 128, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (16, 256, 8, 4)]


def routers(params):
    def fn(x):
        return [torch.ops.moec.router(x, p["router"], None) for p in params]
    return fn


def run(args):
    peak, bw = ceilings()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "layers": args.layers, "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    print(json.dumps(info), flush=True)
    rows = []
    for name in args.shapes.split(","):
        s = SHAPES[name]
        params = [{n: t.detach() for n, t in make_params(s, "cuda", seed=i).items()} for i in range(args.layers)]
        layer, alone = chain(moec_layer, s, params), routers(params)
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16)
            floor, want = touched_floor_ms(s, params, x, peak, bw)
            per = lambda ms: ms * 1e3 / args.layers
            row = {"shape": s.name, "tokens": T, "floor_us": per(floor), "kernel": []}
            router_op.set_enabled(False)
            with torch.no_grad():
                ref_logits = alone(x)
                row["linear_err"] = rel_err(layer(x), want)
            row["linear_layer_us"], row["linear_router_us"] = per(replay_ms(layer, x)), per(replay_ms(alone, x))
            router_op.set_enabled(True)
            for cfg in SETTINGS:
                router_op.set_settings(cfg)
                try:
                    with torch.no_grad():
                        logit_err = max(rel_err(a, b) for a, b in zip(alone(x), ref_logits))
                        err = rel_err(layer(x), want)
                    row["kernel"].append({"settings": cfg, "layer_us": per(replay_ms(layer, x)),
                                          "router_us": per(replay_ms(alone, x)), "err": err, "logit_err": logit_err})
                except Exception as exc:
                    print(f"{s.name} T={T} {cfg}: {type(exc).__name__}: {exc}"[:400], flush=True)
            router_op.set_settings(SETTINGS[0])
            best = min(row["kernel"], key=lambda r: r["layer_us"])
            row["best"] = best
            print(f"{s.name} T={T}: floor {row['floor_us']:.1f}; layer with linear {row['linear_layer_us']:.1f} us, "
                  f"with moec.router {best['layer_us']:.1f} at {best['settings']}; router alone "
                  f"{row['linear_router_us']:.1f} -> {best['router_us']:.1f} us; logits err {best['logit_err']:.1e}; "
                  "all: " + ", ".join(f"{r['settings']} {r['layer_us']:.1f}/{r['router_us']:.1f}"
                                      for r in row["kernel"]), flush=True)
            rows.append(row)
        del params, layer, alone
        torch.cuda.empty_cache()
    return info, rows


def table(rows):
    head = ("| layer | tokens | floor us | router: linear us | router: moec us | layer with linear us | "
            "layer with moec.router us | speedup | % of floor | settings |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['shape']} | {r['tokens']} | {r['floor_us']:.1f} | {r['linear_router_us']:.1f} | "
        f"{r['best']['router_us']:.1f} | {r['linear_layer_us']:.1f} | {r['best']['layer_us']:.1f} | "
        f"{r['linear_layer_us'] / r['best']['layer_us']:.2f}x | {r['floor_us'] / r['best']['layer_us']:.0%} | "
        f"{tuple(r['best']['settings'])} |\n" for r in rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe,gptoss,mixtral")
    ap.add_argument("--tokens", default="1,2,8")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    info, rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "router_ab.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    md = (f"device: {info['device']}; torch {info['torch']}; triton {info['triton']}; {info['date']}; "
          f"{info['layers']} layers a graph\n\n" + table(rows))
    with open(os.path.join(args.out, "router_ab.md"), "w") as f:
        f.write(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
