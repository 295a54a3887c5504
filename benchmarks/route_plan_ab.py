"""A decode step's routing, in one process: the router GEMM + route_plan (router scores -> top-k ->
plan) with its top-k by k argmax rounds or by one sort (route_plan_kernel.SORT, the default since stop 37), and
the router GEMM, routing and plan in one launch (router_plan_kernel.py; `moec.router_plan`, which
passes/fuse_router.py emits with MOEC_ROUTER_PLAN=1) with either top-k. Each timed alone (20 in
one CUDA graph, per routing), and each in four moec layers chained in one graph (decode_chain's
model of a decode step, per layer).

Run: python benchmarks/route_plan_ab.py [--shapes qwen3,olmoe,gptoss,deepseek] [--tokens 1,2,8] [--out DIR]
"""
import argparse
import datetime
import json
import os

import torch
import triton

from decode_chain import chain, layer_params, replay_ms
from layers import SHAPES, moec_layer, router_plan

from moec.codegen import route_plan_kernel
from moec.codegen.router_plan_kernel import router_plan_launch

REPEAT = 20


def two_launches(s, x, w_router, bias):
    return torch.ops.moec.route_plan(x @ w_router.t(), bias, s.k, s.scoring, s.renormalize, 1.0, s.n_group,
                                     s.topk_group, s.E)


def one_launch(s, x, w_router, bias, sort, ticket=None):
    return router_plan_launch(x, w_router, None, bias, s.k, s.scoring, s.renormalize, 1.0, s.n_group, s.topk_group,
                              sort=sort, ticket=ticket)[1:]


def routing_us(fn):
    def repeated(_):
        for _ in range(REPEAT):
            fn()
    return replay_ms(repeated, None) * 1e3 / REPEAT


def run(args):
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "layers": args.layers}
    print(json.dumps(info), flush=True)
    rows = []
    for name in args.shapes.split(","):
        s = SHAPES[name]
        params = layer_params(s, args.layers)
        fn = chain(moec_layer, s, params)
        fn_one = chain(lambda s, p, x: moec_layer(s, p, x, router_plan), s, params)     # moec.router_plan
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16)
            w_router, bias = params[0]["router"], params[0].get("score_bias")
            row = {"shape": s.name, "tokens": T}
            outs = {}
            default = route_plan_kernel.SORT
            with torch.no_grad():
                for sort in (False, True):
                    route_plan_kernel.SORT = sort
                    tag = "sort" if sort else "rounds"
                    outs[tag] = two_launches(s, x, w_router, bias)
                    row[f"{tag}_route_us"] = routing_us(lambda: two_launches(s, x, w_router, bias))
                    row[f"{tag}_layer_us"] = replay_ms(fn, x) * 1e3 / args.layers
                    outs["one_" + tag] = one_launch(s, x, w_router, bias, sort)
                    row[f"one_{tag}_route_us"] = routing_us(lambda: one_launch(s, x, w_router, bias, sort))
                    row[f"one_{tag}_layer_us"] = replay_ms(fn_one, x) * 1e3 / args.layers
                    kept = torch.zeros(1, dtype=torch.int32, device="cuda")     # no memset a launch
                    row[f"one_{tag}_kept_route_us"] = routing_us(lambda: one_launch(s, x, w_router, bias, sort, kept))
            route_plan_kernel.SORT = default
            # the one-launch GEMM sums in another order than cuBLAS: a near tie may route differently
            row["same_routing"] = {tag: all(torch.equal(a, b) for a, b in zip(outs["rounds"][1:], outs[tag][1:]))
                                   for tag in ("sort", "one_rounds", "one_sort")}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del params, fn
        torch.cuda.empty_cache()
    return info, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe,gptoss,deepseek")
    ap.add_argument("--tokens", default="1,2,8")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    info, rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "route_plan_ab.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    lines = [f"device: {info['device']}; torch {info['torch']}; triton {info['triton']}; {info['date']}; "
             f"{info['layers']} layers a graph", "",
             "| layer | tokens | GEMM + route_plan us, k rounds | same, sort | one launch us, k rounds | one launch, sort "
             "| one launch, kept counter, k rounds | same, sort "
             "| layer us, k rounds | layer us, sort | layer us, one launch, k rounds | same, sort "
             "| same routing (sort, one rounds, one sort) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['tokens']} | {r['rounds_route_us']:.2f} | {r['sort_route_us']:.2f} | "
              f"{r['one_rounds_route_us']:.2f} | {r['one_sort_route_us']:.2f} | "
              f"{r['one_rounds_kept_route_us']:.2f} | {r['one_sort_kept_route_us']:.2f} | "
              f"{r['rounds_layer_us']:.1f} | {r['sort_layer_us']:.1f} | "
              f"{r['one_rounds_layer_us']:.1f} | {r['one_sort_layer_us']:.1f} | "
              f"{', '.join(str(v) for v in r['same_routing'].values())} |" for r in rows]
    with open(os.path.join(args.out, "route_plan_ab.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
