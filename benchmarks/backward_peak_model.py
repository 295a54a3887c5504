"""The training step's memory peak of one moec layer, modelled on the CPU: bytes of live tensors
above the weights and x at each weight-gradient launch, kernels skipped (their buffers are made
as on the GPU; only the launches are no-ops). On 2026-12-05 it gave 1472 / 1136 / 1947 MiB for
Qwen3 / OLMoE / GPT-OSS at 4096 tokens where an H100 measured 1474 / 1138 / 1948
(`results/bench_layer_4096_h100_host.md`, torch.cuda.max_memory_allocated). --compiled: the ops as a
compiled step calls them, each tensor freed after its last use (2026-12-06, with the backward as two
ops: Qwen3 1360, OLMoE 992 MiB; HF grouped_mm + torch.compile measured 1425, 1072; as three ops,
pre freed before any weight gradient: see HISTORY.md's stop 28).

Run: python benchmarks/backward_peak_model.py --shape qwen3 [--tokens 4096] [--copy-mib 48] [--compiled]
"""
import argparse
import gc

import torch

import host_overhead
from layers import SHAPES, make_params, moec_weights
from moec.codegen import kernels, reference, wgrad_kernel


def live_bytes():
    storages = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--copy-mib", type=int, default=None, help="wgrad_kernel.MAX_COPY_BYTES in MiB")
    ap.add_argument("--compiled", action="store_true",
                    help="the ops called as a compiled step calls them (tensors freed after their last use)")
    args = ap.parse_args()
    if args.copy_mib is not None:
        wgrad_kernel.MAX_COPY_BYTES = args.copy_mib << 20
    s = SHAPES[args.shape]
    p = make_params(s, "cpu")
    x = torch.randn(args.tokens, s.H, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():      # real routing: the silenced kernels would leave it uninitialised
        w, ids = reference.route(x @ p["router"].t(), p.get("score_bias"), s.k, s.scoring, s.renormalize, 1.0,
                                 s.n_group, s.topk_group)
        offsets, src, inv = reference.plan(ids, s.E)
    w = w.requires_grad_()
    bases, layout = moec_weights(s, p)
    host_overhead._silence_kernels()
    held, seen, real = live_bytes(), [], wgrad_kernel._launch

    def counting(*a, **kw):
        seen.append((live_bytes() - held) / 2 ** 20)
        return real(*a, **kw)
    wgrad_kernel._launch = counting
    with kernels.backend("triton"):
        if args.compiled:
            _as_compiled(x, src, offsets, inv, w, s, bases, layout)
        else:
            out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, w, s.k, bases, layout, s.activation, 1.702,
                                                    7.0, True)
            torch.autograd.grad(out, [x, w] + [b for b in bases if b.requires_grad], torch.randn_like(out))
    chunks = f"copy chunks of {wgrad_kernel.copy_mib()} MiB" if wgrad_kernel.copy_mib() else "one copy"
    print(f"{s.name} T={args.tokens} {chunks}{' (compiled)' if args.compiled else ''}: live MiB above the "
          f"weights at each weight-gradient launch {[round(v) for v in seen]}, peak {max(seen):.0f}")


def _as_compiled(x, src, offsets, inv, w, s, bases, layout):
    """The forward and backward ops as a compiled step runs them: each tensor dropped after its
    last reader, as Inductor's generated code does (eager autograd keeps every saved tensor to the
    end of the backward). The backward's three ops where experts_combine_op._backward splits it."""
    from moec.codegen import layout as layouts
    args = (s.activation, 1.702, 7.0)
    out, pre = torch.ops.moec.experts_combine(x, src, offsets, inv, w, s.k, bases, layout, *args, True)
    grad = torch.randn_like(out)
    del out
    needs = [True] * len(bases)
    phases = layouts.split_phases(bases, layout, needs)
    if phases is None:
        grads = torch.ops.moec.experts_combine_backward(grad, x, src, offsets, inv, w, pre, s.k, bases, layout, *args,
                                                        needs)
        del pre
    else:
        down, first = phases
        dx, dw, hw, du, dg = torch.ops.moec.experts_combine_backward_rows(grad, x, src, offsets, inv, w, pre, s.k,
                                                                          bases, layout, *args)
        del pre
        none = x.new_empty(0)
        grads = [dx, dw] + torch.ops.moec.experts_wgrad(none, x, src, offsets, s.k, none, du, dg, bases, layout, first)
        del du, dg
        grads += torch.ops.moec.experts_down_wgrad(grad, hw, src, offsets, w, s.k, bases, layout, down)
    return grads


if __name__ == "__main__":
    main()
