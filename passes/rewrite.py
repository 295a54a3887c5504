"""Pass `rewrite`: replace each detected MoE region with moec's ops.

Expects: the regions of the `detect` report, on the same graph.
Guarantees: each region's output is computed by
    weights, ids        = moec.route(logits, score_bias)           # (T, k) f32, (T, k) i64
    offsets, src, inv   = moec.plan(ids)                           # (E+1,), (T*k,), (T*k,)
    y                   = moec.experts(x, src, offsets, bases, layout)  # (T*k, H) by expert
    out                 = moec.combine(y, inv, weights)             # (T, H)
and the region's own nodes are gone. The router's linear and everything outside the regions
stay as they were. Weights enter as the graph inputs themselves, each once, with a layout string
saying which view (transpose, strided slice) each role reads (codegen/layout.py); never copies,
so optimizers and checkpoints keep seeing the user's parameters.
"""
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from moec.codegen import layout as layouts

from .graph import Emitter, value

PASS = "rewrite"


@dataclass(frozen=True)
class RewriteReport:
    rewritten: tuple   # module paths, in graph order
    skipped: tuple     # (module, why) for regions left alone on purpose (e.g. bisecting)


def rewrite(gm: fx.GraphModule, ctx) -> tuple:
    regions = ctx.reports["detect"].regions
    limit = ctx.config.max_rewrites
    done, skipped = [], []
    for i, region in enumerate(regions):
        if 0 <= limit <= i:
            skipped.append((region.module, f"max_rewrites={limit}"))
            continue
        owner = gm.get_submodule(region.graph) if region.graph else gm
        _rewrite_region(owner.graph, region, ctx.fake_mode)
        owner.graph.lint()
        owner.recompile()
        done.append(region.module)
    gm.graph.lint()
    gm.recompile()
    return gm, RewriteReport(tuple(done), tuple(skipped))


def _needs_cast(logits_dtype, score_dtype):
    """Whether the logits go to the route op cast to the dtype the user's code scores in. Not
    from bf16 / fp16 up to float32: moec.route reads them into float32 registers, the same values
    a cast would give, so the cast would be a kernel of its own (a decode step's latency) and a
    float32 copy saved for the backward."""
    if score_dtype is None or score_dtype == logits_dtype:
        return False
    return not (score_dtype == torch.float32 and logits_dtype in (torch.bfloat16, torch.float16))


def _rewrite_region(graph, region, fake_mode):
    emit = Emitter(graph, region.output, fake_mode, PASS)
    r, ex = region.router, region.experts
    with graph.inserting_before(region.output):
        x = region.x
        if len(value(x).shape) != 2:
            x = emit.method("reshape", x, -1, ex.hidden)
        logits = region.logits
        if _needs_cast(value(logits).dtype, r.score_dtype):
            logits = emit.method("to", logits, r.score_dtype)
        outside = r.renorm_outside_route
        routed = emit.op(torch.ops.moec.route.default, logits, region.score_bias, r.top_k,
                         r.scoring, r.renormalize and not outside, 1.0 if outside else r.scale,
                         r.n_group, r.topk_group, r.group_fill)
        weights, ids = emit.item(routed, 0), emit.item(routed, 1)
        if outside:   # the user's own epsilon (identify.route_with_capacity does the same)
            total = emit.op(operator.add, emit.method("sum", weights, -1, True), r.renorm_eps)
            weights = emit.op(operator.mul, emit.op(operator.truediv, weights, total), r.scale)
        if r.capacity is not None:
            weights, ids = _apply_capacity(emit, r, weights, ids, ex.num_experts)
        plan = emit.op(torch.ops.moec.plan.default, ids, ex.num_experts)
        offsets, src, inv = (emit.item(plan, j) for j in range(3))
        # the base tensors go in as they are and the op takes its views below autograd, so each
        # fused parameter gets one gradient buffer, not a slice_backward (zeros + copy + add) per view
        bases, layout = layouts.pack((ex.up, ex.gate, ex.down, ex.up_bias, ex.gate_bias, ex.down_bias), ex.lora)
        y = emit.op(torch.ops.moec.experts.default, x, src, offsets, r.top_k, list(bases), layout,
                    ex.activation, ex.alpha, ex.limit)
        out = emit.op(torch.ops.moec.combine.default, y, inv, weights)
        want = value(region.output).dtype
        if want != value(x).dtype:
            out = emit.method("to", out, want)
    region.output.replace_all_uses_with(out)
    inside = set(region.nodes)
    for alias in region.aliases:
        alias.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inside)
    for node in reversed(region.nodes):
        if node not in region.kept:
            graph.erase_node(node)


def _apply_capacity(emit, router, weights, ids, num_experts):
    """Dropped copies get id -1 (moec.plan drops them) and weight 0; the kept weights are
    renormalised if the router renormalises. Mirrors identify.route_with_capacity."""
    keep = emit.op(torch.ops.moec.capacity_keep.default, ids, num_experts, router.capacity, router.capacity_order)
    ids = emit.op(torch.where, keep, ids, -1)
    weights = emit.op(operator.mul, weights, keep)
    if router.renormalize:
        total = emit.method("sum", weights, -1, True)
        eps = torch.finfo(value(weights).dtype).eps
        weights = emit.op(operator.truediv, weights, emit.method("clamp_min", total, eps))
    return weights, ids
