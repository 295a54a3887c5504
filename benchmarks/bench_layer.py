"""One MoE layer (router + top-k + experts + combine, bf16): moec ops vs HF-style eager loop,
HF-style torch._grouped_mm (eager and under default torch.compile), SonicMoE where it is installed
and can run the layer (sonic_peer.py), and the roofline floor.

Prints a markdown table, writes JSON (+ .md, + .png when matplotlib is there) to --out.
ms = median of triton.testing.do_bench; train = forward + backward (grads of x and all weights).
Peak MiB = what one step allocates above the weights and x (torch.cuda.max_memory_allocated).
Floor = max(FLOPs / measured bf16 matmul peak, bytes / measured copy bandwidth), bytes counting
only the experts the routing actually touched. Run: python benchmarks/bench_layer.py --out DIR
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(__file__))
import moec.codegen  # noqa: E402,F401  (registers torch.ops.moec)
from torch._dynamo.utils import counters  # noqa: E402
from host_overhead import enqueue_us  # noqa: E402
from layers import (SHAPES, hf_grouped_layer, hf_loop_layer, make_params, moec_layer, moec_unfused_layer,  # noqa: E402
                    rel_err)
from sonic_peer import sonic_layer, version as sonic_version  # noqa: E402
from moec.codegen import fast_launch, pdl, streams, wgrad_kernel  # noqa: E402

METHODS = ("moec", "moec_compiled", "moec_unfused", "hf_loop", "hf_grouped_mm", "hf_grouped_mm_compiled", "sonicmoe")
# --reduce-overhead: the two compiled layers under mode="reduce-overhead" (Inductor's CUDA graph trees,
# forward and backward), as a user whose steps are host-bound would run them
RO_METHODS = ("moec_compiled_ro", "hf_grouped_mm_compiled_ro")
GRAPH_METHODS = ("moec", "moec_compiled", "moec_unfused", "hf_grouped_mm_compiled")   # the loop syncs (.tolist()): not capturable


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a, warmup=50, rep=200, return_mode="median")
    flops = 2 * 8192 ** 3 / (ms * 1e-3)
    buf = torch.empty(1 << 29, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(buf)
    ms = triton.testing.do_bench(lambda: dst.copy_(buf), warmup=50, rep=200, return_mode="median")
    del a, buf, dst
    return flops, 2 * (1 << 30) / (ms * 1e-3)


def floor_ms(s, T, ids, peak_flops, bw, train):
    touched = torch.unique(ids).numel()
    gated_flops = 2 * T * s.k * (s.H * 2 * s.F + s.F * s.H) + 2 * T * s.H * s.E + 2 * T * 3 * s.H * s.shared_F
    weight_bytes = 2 * (touched * 3 * s.F * s.H + s.E * s.H + 3 * s.H * s.shared_F)
    act_bytes = 2 * 2 * T * s.H
    flops, byts = (3 * gated_flops, 3 * weight_bytes + 3 * act_bytes) if train else (gated_flops, weight_bytes + act_bytes)
    return max(flops / peak_flops, byts / bw) * 1e3, flops


def capture(step):
    """One step captured in a CUDA graph (warmed up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph


def bench_graph(step):
    """One step (forward, or forward + backward) replayed from a CUDA graph: its GPU time with
    the host's enqueue cost gone, as `mode="reduce-overhead"` sees it, and a timing a slow host
    cannot distort."""
    return triton.testing.do_bench(capture(step).replay, warmup=10, rep=60, return_mode="median")


def moec_compiled(s, params, mode=None):
    """The HF-style grouped_mm layer under torch.compile(backend="moec"), as users run moec: the
    ops are called from the compiled graph (no eager custom-op autograd dispatch, router GEMM by
    Inductor). Refuses to time a layer moec did not fuse."""
    fn = torch.compile(lambda x: hf_grouped_layer(s, params, x), backend="moec", mode=mode)

    def run(x):
        mode = torch.is_grad_enabled()     # Dynamo compiles once per grad mode: each must fuse
        before = counters["moec"]["regions_fused"]
        out = fn(x)
        if mode not in run.fused and counters["moec"]["regions_fused"] == before:
            raise RuntimeError("moec did not fuse the layer (see TORCH_LOGS=+moec)")
        run.fused.add(mode)
        return out
    run.fused = set()
    return run


def make_step(fn, params, x, train):
    # a peer holding its own copies of the weights (sonic_peer) names them in fn.leaves
    leaves = [x] + getattr(fn, "leaves", [t for t in params.values() if t.requires_grad])
    if train:
        probe = torch.randn(x.shape, device=x.device, dtype=x.dtype)

        def step():
            out = fn(x)
            torch.autograd.grad((out * probe).sum(), leaves)
    else:
        def step():
            with torch.no_grad():
                fn(x)
    return step


def bench(step):
    step()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median")
    return ms, peak_mib(step), host_ms(step)


def host_ms(step, n=10):
    """Host time to enqueue one step: where it nears the step's time, do_bench measured the host,
    not the kernels (a slower CPU reads as a slower layer)."""
    return enqueue_us(step, n) / 1e3


def peak_mib(step):
    """Memory one step allocates above what is held before it (weights, x): saved activations,
    the backward's temporaries and the gradients, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - held) / 2 ** 20


def run(args):
    peak, bw = ceilings()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "wgrad_stream": streams.wgrad_stream_enabled(),
            "fast_launch": fast_launch.enabled(), "pdl_max_tokens": pdl.max_tokens(), "wgrad_copy_mib": wgrad_kernel.copy_mib(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "matmul_bf16_tflops": peak / 1e12, "copy_gbps": bw / 1e9, "sonic_moe": sonic_version()}
    print(json.dumps(info), flush=True)
    rows = []
    for key in args.shapes.split(","):
        s = SHAPES[key]
        params = make_params(s, "cuda")
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: hf_grouped_layer(s, params, x))
        fns = {"moec": lambda x: moec_layer(s, params, x), "moec_compiled": moec_compiled(s, params), "moec_unfused": lambda x: moec_unfused_layer(s, params, x),
               "hf_loop": lambda x: hf_loop_layer(s, params, x),
               "hf_grouped_mm": lambda x: hf_grouped_layer(s, params, x), "hf_grouped_mm_compiled": compiled}
        if args.reduce_overhead:
            fns["moec_compiled_ro"] = moec_compiled(s, params, mode="reduce-overhead")
            fns["hf_grouped_mm_compiled_ro"] = torch.compile(lambda x: hf_grouped_layer(s, params, x),
                                                             mode="reduce-overhead")
        fns = {name: fn for name, fn in fns.items() if name not in args.skip.split(",")}
        sonic_error = None
        try:
            if "sonicmoe" in args.skip.split(","):
                raise RuntimeError("skipped (--skip)")
            fns["sonicmoe"] = sonic_layer(s, params)
        except Exception as e:  # Unsupported or failing to build: the column says why, the run goes on
            sonic_error = _why(e)
        for T in [int(t) for t in args.tokens.split(",")]:
            if key == "deepseek" and T > args.deepseek_max_tokens:
                continue
            x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16).requires_grad_()
            with torch.no_grad():
                _, ids = moec_layer.__globals__["reference"].route(x @ params["router"].t(), params.get("score_bias"),
                                                                   s.k, s.scoring, s.renormalize, 1.0, s.n_group, s.topk_group)
                ref = hf_loop_layer(s, params, x).float()
                err = rel_err(moec_layer(s, params, x), ref)
                sonic_acc = {}
                if "sonicmoe" in fns:
                    try:
                        # timing training only: check its training kernels, not inference ones QuACK would compile
                        # for this check alone (~75 s a GEMM)
                        with torch.set_grad_enabled("fwd" not in args.modes.split(",")):
                            sonic_acc["sonicmoe_rel_err"] = rel_err(fns["sonicmoe"](x), ref)
                    except Exception as e:
                        sonic_acc = {"sonicmoe_rel_err": None, "sonicmoe_rel_err_error": _why(e)}
            for train in [m == "train" for m in args.modes.split(",")]:
                fl, flops = floor_ms(s, T, ids, peak, bw, train)
                row = {"shape": s.name, "E": s.E, "k": s.k, "H": s.H, "F": s.F, "tokens": T,
                       "mode": "train" if train else "fwd", "floor_ms": fl, "flops": flops, "moec_rel_err": err,
                       **sonic_acc}
                if sonic_error:
                    row.update(sonicmoe=None, sonicmoe_error=sonic_error)
                for name, fn in fns.items():
                    if name == "hf_loop" and T * s.k > args.loop_max_copies and train:
                        continue
                    t0 = time.time()
                    try:
                        row[name], row[name + "_peak_mib"], row[name + "_host_ms"] = bench(
                            make_step(fn, params, x, train))
                    except Exception as e:  # record and go on: one failing peer must not end the run
                        row[name] = None
                        row[name + "_error"] = _why(e)
                    row[name + "_wall_s"] = round(time.time() - t0, 1)
                    # as each method ends, so a call cut off in a slow peer's compile keeps the others' times
                    print(f"  {s.name} T={T} {row['mode']} {name}: {row[name]} ms ({row[name + '_wall_s']} s)", flush=True)
                if args.graphs:
                    for name in (m for m in GRAPH_METHODS if m in fns):
                        try:
                            row[name + "_graph"] = bench_graph(make_step(fns[name], params, x, train))
                        except Exception as e:
                            row[name + "_graph"] = None
                            row[name + "_graph_error"] = _why(e)
                rows.append(row)
                print(_line(row), flush=True)
                _save(args.out, info, rows)
        del params, fns, compiled
        torch.cuda.empty_cache()
    print("\n" + table(rows))
    return info, rows


def _why(e):
    return f"{type(e).__name__}: {str(e)[:200]}"


def _line(r):
    names = list(METHODS) + [m for m in RO_METHODS if m in r] + [m + "_graph" for m in GRAPH_METHODS if m + "_graph" in r]
    parts = [f"{m}={r[m]:.3f}" if r.get(m) is not None else f"{m}=NA" for m in names]
    for m in ("moec", "moec_compiled", "hf_grouped_mm_compiled"):
        if r.get(m + "_peak_mib") is not None:
            parts.append(f"{m}_peak={r[m + '_peak_mib']:.0f}MiB")
        if r.get(m + "_host_ms") is not None:
            parts.append(f"{m}_host={r[m + '_host_ms']:.3f}")
    if r.get("sonicmoe_rel_err") is not None:
        parts.append(f"sonicmoe_err={r['sonicmoe_rel_err']:.1e}")
    return f"{r['shape']} T={r['tokens']} {r['mode']} floor={r['floor_ms']:.3f} err={r['moec_rel_err']:.1e} " + " ".join(parts)


def host_bound(r, name):
    ms, host = r.get(name), r.get(name + "_host_ms")
    return bool(ms and host and host >= 0.9 * ms)


def table(rows):
    fmt = lambda v: "—" if v is None else f"{v:.3f}"
    speedup = lambda peer, m: f"{peer / m:.2f}x" if peer and m else "—"
    hosted = []
    out = ["| layer | tokens | mode | floor ms | moec ms | moec compiled ms | moec unfused ms | HF loop ms | "
           "HF grouped_mm ms | HF grouped_mm + compile ms | SonicMoE ms | moec speedup vs compiled | "
           "moec compiled speedup vs compiled | moec speedup vs SonicMoE | moec % of floor | "
           "peak MiB moec / moec compiled / HF compiled | host ms moec / moec compiled / HF compiled |", "|" + "---|" * 17]
    for r in rows:
        c, m, so = r.get("hf_grouped_mm_compiled"), r.get("moec"), r.get("sonicmoe")
        pf = f"{100 * r['floor_ms'] / m:.0f}%" if m else "—"
        if host_bound(r, "moec") or host_bound(r, "hf_grouped_mm_compiled"):
            hosted.append(f"{r['shape']} {r['tokens']} {r['mode']}")
        mem = lambda name: "—" if r.get(name + "_peak_mib") is None else f"{r[name + '_peak_mib']:.0f}"
        mc = r.get("moec_compiled")
        out.append(f"| {r['shape']} | {r['tokens']} | {r['mode']} | {fmt(r['floor_ms'])} | {fmt(m)} | {fmt(mc)} "
                   f"| {fmt(r.get('moec_unfused'))} | {fmt(r.get('hf_loop'))} "
                   f"| {fmt(r.get('hf_grouped_mm'))} | {fmt(c)} | {fmt(so)} | {speedup(c, m)} | {speedup(c, mc)} "
                   f"| {speedup(so, m)} | {pf} | {mem('moec')} / {mem('moec_compiled')} / {mem('hf_grouped_mm_compiled')} "
                   f"| {fmt(r.get('moec_host_ms'))} / {fmt(r.get('moec_compiled_host_ms'))} "
                   f"/ {fmt(r.get('hf_grouped_mm_compiled_host_ms'))} |")
    if hosted:
        out += ["", f"Host-bound (enqueueing the step took >= 90% of its time, for moec or HF compiled): "
                    f"{'; '.join(hosted)}. Those rows time the CPU, not the kernels."]
    ro = [r for r in rows if "moec_compiled_ro" in r]
    if ro:
        out += ["", "Under `mode=\"reduce-overhead\"` (Inductor's CUDA graph trees, forward and backward):", "",
                "| layer | tokens | mode | floor ms | moec compiled ms | HF grouped_mm + compile ms | speedup | "
                "moec % of floor |", "|" + "---|" * 8]
        for r in ro:
            m, c = r.get("moec_compiled_ro"), r.get("hf_grouped_mm_compiled_ro")
            pf = f"{100 * r['floor_ms'] / m:.0f}%" if m else "—"
            out.append(f"| {r['shape']} | {r['tokens']} | {r['mode']} | {fmt(r['floor_ms'])} | {fmt(m)} | {fmt(c)} | "
                       f"{speedup(c, m)} | {pf} |")
    graphed = [r for r in rows if "moec_graph" in r]
    if graphed:
        out += ["", "Replayed from a CUDA graph (GPU time alone, as `reduce-overhead` sees it):", "",
                "| layer | tokens | mode | floor ms | moec ms | moec compiled ms | HF grouped_mm + compile ms | "
                "moec speedup vs compiled | moec % of floor | moec compiled % of floor | HF compiled % of floor |",
                "|" + "---|" * 11]
        pct = lambda r, v: f"{100 * r['floor_ms'] / v:.0f}%" if v else "—"
        for r in graphed:
            c, m, mc = r.get("hf_grouped_mm_compiled_graph"), r.get("moec_graph"), r.get("moec_compiled_graph")
            out.append(f"| {r['shape']} | {r['tokens']} | {r['mode']} | {fmt(r['floor_ms'])} | {fmt(m)} | {fmt(mc)} | {fmt(c)} | "
                       f"{speedup(c, m)} | {pct(r, m)} | {pct(r, mc)} | {pct(r, c)} |")
    return "\n".join(out)


def _save(out, info, rows):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_layer.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="olmoe,qwen3,mixtral,gptoss,deepseek")
    p.add_argument("--tokens", default="16,256,4096,16384")
    p.add_argument("--deepseek-max-tokens", type=int, default=4096)
    p.add_argument("--skip", default="", help="methods to leave out, e.g. hf_loop,hf_grouped_mm,moec_unfused")
    p.add_argument("--loop-max-copies", type=int, default=1 << 30)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--graphs", action="store_true", help="also time steps replayed from CUDA graphs (forward, and forward + backward)")
    p.add_argument("--modes", default="fwd,train", help="fwd (inference forward), train (forward + backward)")
    p.add_argument("--reduce-overhead", action="store_true",
                   help="also moec compiled and HF compiled under mode='reduce-overhead' (CUDA graph trees)")
    p.add_argument("--wgrad-stream", action="store_true", help="moec's weight gradients on a second stream")
    p.add_argument("--no-fast-launch", action="store_true",
                   help="every Triton launch through Triton's own path (codegen/fast_launch.py off)")
    p.add_argument("--wgrad-copy-mib", type=int, default=None,
                   help="chunk size of the weight gradients' gathered copies (wgrad_kernel.MAX_COPY_BYTES); "
                        "a large value makes one copy, as before the chunks")
    args = p.parse_args()
    if args.wgrad_copy_mib is not None:
        wgrad_kernel.MAX_COPY_BYTES = args.wgrad_copy_mib << 20
    streams.set_wgrad_stream(args.wgrad_stream)
    fast_launch.set_enabled(not args.no_fast_launch)
    info, rows = run(args)
    _save(args.out, info, rows)
    with open(os.path.join(args.out, "bench_layer.md"), "w") as f:
        f.write(f"device: {info['device']}; torch {info['torch']}; triton {info['triton']}; "
                f"sonic-moe {info['sonic_moe']}; {info['date']}\n"
                f"measured bf16 matmul {info['matmul_bf16_tflops']:.0f} TFLOP/s, copy {info['copy_gbps']:.0f} GB/s\n\n")
        f.write(table(rows) + "\n")
    try:
        from plot_layer import plot
        plot(os.path.join(args.out, "bench_layer.json"), os.path.join(args.out, "bench_layer.png"))
    except ImportError as e:
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
