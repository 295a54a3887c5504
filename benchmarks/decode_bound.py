"""How close to issue 9's bandwidth floor can a decode step's MoE layer get at all? A kernel that does
nothing but read the expert weights the routing touched (each program sums a slice of one touched
expert's gate/up or down rows; no GEMV, no activation, no combine) is timed as decode_chain.py times
a layer: L layers in one CUDA graph, per layer, against the same floor (bytes the routing touched over
the measured copy bandwidth). Two rows a shape:
- stream: the read alone, ids already known (two launches a layer: gate/up rows, then down rows);
- routed: moec's routing first (router GEMM + route_plan), the read taking its ids from route_plan's
  output on the device, as any real layer must.
The best over a small sweep of programs per expert and warps. What moec's layer takes beyond `routed`
is what its GEMV, activation and combine cost; what `routed` takes beyond the floor, no kernel that
routes first can avoid without overlapping the routing with weight reads.

One token only: there a token's k experts are k distinct reads, exactly the floor's bytes (at more tokens
copies share experts, which the floor counts once).

Run: python benchmarks/decode_bound.py [--shapes qwen3,olmoe] [--layers 4] [--out DIR]
"""
import argparse
import datetime
import json
import os
import platform

import torch
import triton
import triton.language as tl

from bench_layer import ceilings
from decode_chain import layer_params, replay_ms, touched_floor_ms, write
from layers import SHAPES, _route, moec_layer, route_plan


@triton.jit
def read_rows_kernel(w_ptr, ids_ptr, out_ptr, row_len, chunk, PER_EXPERT: tl.constexpr, BLOCK: tl.constexpr):
    # program p reads slice p % PER_EXPERT of expert ids[p // PER_EXPERT]'s row (row_len elements)
    pid = tl.program_id(0)
    e = tl.load(ids_ptr + pid // PER_EXPERT).to(tl.int64)
    start = (pid % PER_EXPERT) * chunk
    base = w_ptr + e * row_len + start
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, chunk, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(base + offs, mask=(offs < chunk) & (start + offs < row_len), other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def read_rows(w, ids, per_expert, warps, block=2048):
    """Sum each touched expert's weights in per_expert slices; w (E, ...) contiguous, ids any shape."""
    ids = ids.reshape(-1)
    row_len = w[0].numel()
    chunk = triton.cdiv(triton.cdiv(row_len, per_expert), block) * block
    out = torch.empty(ids.numel() * per_expert, device=w.device, dtype=torch.float32)
    read_rows_kernel[(out.numel(),)](w, ids, out, row_len, chunk, PER_EXPERT=per_expert, BLOCK=block,
                                     num_warps=warps)
    return out


def stream_chain(s, params, ids_per_layer, per_expert, warps):
    def fn(x):
        for p, ids in zip(params, ids_per_layer):
            read_rows(p["gate_up"], ids, per_expert, warps)
            read_rows(p["down"], ids, per_expert, warps)
        return x
    return fn


def routed_chain(s, params, per_expert, warps):
    def fn(x):
        for p in params:
            _, ids, _, _, _ = route_plan(s, p, x)
            read_rows(p["gate_up"], ids, per_expert, warps)
            read_rows(p["down"], ids, per_expert, warps)
        return x
    return fn


def moec_chain(s, params):
    def fn(x):
        for p in params:
            x = x + moec_layer(s, p, x)
        return x
    return fn


SWEEP = [(pe, w) for pe in (4, 8, 12, 16, 24, 32) for w in (4, 8)]


def run(args):
    peak, bw = ceilings()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "layers": args.layers, "copy_gbps": bw / 1e9,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    print(json.dumps(info), flush=True)
    rows = []
    for name in args.shapes.split(","):
        s = SHAPES[name]
        params = layer_params(s, args.layers)
        for T in (1,):
            x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16)
            floor, _ = touched_floor_ms(s, params, x, peak, bw)
            # the stream reads the experts each layer's routing picks on x itself (the floor's are on the chain's
            # inputs: the same count of distinct experts in expectation, not the same experts)
            with torch.no_grad():
                ids = [_route(s, p, x)[1] for p in params]
            row = {"shape": s.name, "tokens": T, "floor_us": floor * 1e3 / args.layers,
                   "moec_us": replay_ms(moec_chain(s, params), x) * 1e3 / args.layers}
            for tag, make in (("stream", lambda pe, w: stream_chain(s, params, ids, pe, w)),
                              ("routed", lambda pe, w: routed_chain(s, params, pe, w))):
                times = {f"{pe}x{w}": replay_ms(make(pe, w), x) * 1e3 / args.layers for pe, w in SWEEP}
                best = min(times, key=times.get)
                row.update({f"{tag}_us": times[best], f"{tag}_best": best, f"{tag}_all": times})
            for tag in ("stream", "routed", "moec"):
                row[f"{tag}_pct_floor"] = 100 * row["floor_us"] / row[f"{tag}_us"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
    return info, rows


def table(rows):
    head = ("| layer | tokens | floor us | read only us (% floor) | routing + read us (% floor) | moec us (% floor) |\n"
            "|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['shape']} | {r['tokens']} | {r['floor_us']:.1f} | {r['stream_us']:.1f} ({r['stream_pct_floor']:.0f}%) | "
        f"{r['routed_us']:.1f} ({r['routed_pct_floor']:.0f}%) | {r['moec_us']:.1f} ({r['moec_pct_floor']:.0f}%) |\n"
        for r in rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    info, rows = run(args)
    write(args.out, "decode_bound", info, rows, table(rows))


if __name__ == "__main__":
    main()
