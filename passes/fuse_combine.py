"""Pass `fuse_combine`: `combine(experts(...))` -> one `moec.experts_combine` op.

Expects: `moec.experts` nodes made by `rewrite` (in the root graph or a higher-order op's
subgraph, e.g. an activation-checkpointed layer), after `expert_parallel` (whose layers have no
`moec.experts` node left: their combine waits for an all-to-all).
Guarantees: each `moec.experts` node whose only reader is a `moec.combine` (as its y) is
replaced, with that combine, by

    out, pre = moec.experts_combine(x, src, offsets, inv, route_w, k, bases, layout, act, alpha, limit, save)

with every reader of the combine reading `out`. save is whether the combine's output needs a
gradient where Dynamo traced it: then autograd keeps the pre-activations (S, 2F) and x, and the
backward recomputes no GEMM and needs no y (S, H) (codegen/experts_combine_launch.py); under
no_grad / inference_mode nothing is kept. LoRA layers too (their u | g include the low-rank
terms; the backward adds the down projection's). Others stay as they were, named in the report.
Must not change: any other node; results (the fused op computes what the pair does).
"""
from dataclasses import dataclass

import torch
import torch.fx as fx

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)

from .graph import Emitter, value

PASS = "fuse_combine"
_EXPERTS = torch.ops.moec.experts.default
_COMBINE = torch.ops.moec.combine.default


@dataclass(frozen=True)
class FuseReport:
    fused: tuple = ()       # (combine node name, save) per fused pair
    kept: tuple = ()        # (experts node name, why it stayed apart)

    def log_lines(self):
        lines = [f"{name}: experts + combine -> moec.experts_combine, "
                 f"{'keeping the pre-activations for the backward' if save else 'keeping nothing (no backward)'}"
                 for name, save in self.fused]
        return lines + [f"{name}: experts and combine stay apart: {why}" for name, why in self.kept]


def fuse_combine(gm: fx.GraphModule, ctx) -> tuple:
    fused, kept = [], []
    for owner in [m for m in gm.modules() if isinstance(m, fx.GraphModule)]:
        changed = False
        for node in [n for n in owner.graph.nodes if n.target is _EXPERTS]:
            why = _why_not(node)
            if why:
                kept.append((node.name, why))
                continue
            combine = next(iter(node.users))
            fused.append((combine.name, _fuse(owner.graph, node, combine, ctx.fake_mode)))
            changed = True
        if changed:
            owner.graph.lint()
            owner.recompile()
    return gm, FuseReport(tuple(fused), tuple(kept))


def _why_not(node) -> str:
    users = list(node.users)
    if len(users) != 1 or users[0].target is not _COMBINE or users[0].args[0] is not node:
        return "its output is read by more than moec.combine"
    return ""


def _fuse(graph, experts, combine, fake_mode) -> bool:
    x, src, offsets, k, bases, layout, activation, alpha, limit = experts.args
    _y, inv, route_w = combine.args
    out_value = value(combine)
    save = bool(getattr(out_value, "requires_grad", True))
    emit = Emitter(graph, combine, fake_mode, PASS)
    with graph.inserting_before(combine):
        fused = emit.op(torch.ops.moec.experts_combine.default, x, src, offsets, inv, route_w, k, bases, layout,
                        activation, alpha, limit, save)
        out = emit.item(fused, 0)
    combine.replace_all_uses_with(out)
    graph.erase_node(combine)
    graph.erase_node(experts)
    return save
