"""The decode step's routing launch (route_plan_kernel: router scores -> top-k -> plan) with its top-k
by k argmax rounds (the default) or by one sort (route_plan_kernel.SORT), in one process: the launch
alone (20 in one CUDA graph, per launch) and four moec layers chained in one graph (decode_chain's
model of a decode step, per layer).

Run: python benchmarks/route_plan_ab.py [--shapes qwen3,olmoe,gptoss,deepseek] [--tokens 1,2,8] [--out DIR]
"""
import argparse
import datetime
import json
import os

import torch
import triton
import triton.testing

from bench_layer import capture
from decode_chain import chain, replay_ms
from layers import SHAPES, make_params, moec_layer

from moec.codegen import route_plan_kernel

REPEAT = 20


def routing_us(s, logits, bias):
    def step():
        for _ in range(REPEAT):
            torch.ops.moec.route_plan(logits, bias, s.k, s.scoring, s.renormalize, 1.0, s.n_group, s.topk_group, s.E)
    return triton.testing.do_bench(capture(step).replay, warmup=10, rep=60, return_mode="median") * 1e3 / REPEAT


def run(args):
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "layers": args.layers}
    print(json.dumps(info), flush=True)
    rows = []
    for name in args.shapes.split(","):
        s = SHAPES[name]
        params = [{n: t.detach() for n, t in make_params(s, "cuda", seed=i).items()} for i in range(args.layers)]
        fn = chain(moec_layer, s, params)
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16)
            logits, bias = x @ params[0]["router"].t(), params[0].get("score_bias")
            row = {"shape": s.name, "tokens": T}
            outs = {}
            for sort in (False, True):
                route_plan_kernel.SORT = sort
                tag = "sort" if sort else "rounds"
                with torch.no_grad():
                    outs[tag] = torch.ops.moec.route_plan(logits, bias, s.k, s.scoring, s.renormalize, 1.0,
                                                          s.n_group, s.topk_group, s.E)
                row[f"{tag}_route_us"] = routing_us(s, logits, bias)
                row[f"{tag}_layer_us"] = replay_ms(fn, x) * 1e3 / args.layers
            route_plan_kernel.SORT = False
            row["same_routing"] = all(torch.equal(a, b) for a, b in zip(outs["rounds"], outs["sort"]))
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
             "| layer | tokens | route_plan us, k rounds | route_plan us, sort | layer us, k rounds | layer us, sort | "
             "same routing |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['tokens']} | {r['rounds_route_us']:.2f} | {r['sort_route_us']:.2f} | "
              f"{r['rounds_layer_us']:.1f} | {r['sort_layer_us']:.1f} | {r['same_routing']} |" for r in rows]
    with open(os.path.join(args.out, "route_plan_ab.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
