"""Pass `fuse_routing`: `plan(route(...)[1])` -> one `moec.route_plan` op.

Expects: `moec.route` / `moec.plan` nodes made by `rewrite` (in the root graph or a higher-order
op's subgraph), after the passes that read them as a pair (`expert_stats`, `chunk_tokens`).
Guarantees: each `moec.plan` whose ids are a `moec.route`'s ids, and the only plan of that route,
is replaced, with that route, by

    w, ids, offsets, src, inv = moec.route_plan(logits, bias, k, scoring, renorm, scale, n_group, topk_group, E,
                                                group_fill)

every reader of the pair's outputs reading the same output of the fused op. At decode sizes the
op routes and plans in one launch (codegen/route_plan_kernel.py); always one dispatch instead of
two. A plan fed otherwise (capacity's kept ids, chunked routing) stays as it is.
Must not change: any other node; results (the fused op computes what the pair does, gradients too).
"""
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)

from .graph import Emitter

PASS = "fuse_routing"
_ROUTE = torch.ops.moec.route.default
_PLAN = torch.ops.moec.plan.default


@dataclass(frozen=True)
class FuseRoutingReport:
    fused: tuple = ()       # plan node names whose route came with them

    def log_lines(self):
        return [f"{name}: route + plan -> moec.route_plan" for name in self.fused]


def fuse_routing(gm: fx.GraphModule, ctx) -> tuple:
    fused = []
    for owner in [m for m in gm.modules() if isinstance(m, fx.GraphModule)]:
        pairs = [(route, plan) for plan in owner.graph.nodes if plan.target is _PLAN
                 for route in [_route_of(plan)] if route is not None]
        for route, plan in pairs:
            _fuse(owner.graph, route, plan, ctx.fake_mode)
            fused.append(plan.name)
        if pairs:
            owner.graph.lint()
            owner.recompile()
    return gm, FuseRoutingReport(tuple(fused))


def _route_of(plan):
    """The moec.route whose ids this plan reads, if the plan is its only one."""
    ids = plan.args[0]
    if not (ids.target is operator.getitem and ids.args[1] == 1 and ids.args[0].target is _ROUTE):
        return None
    route = ids.args[0]
    plans = [u for item in route.users for u in item.users if u.target is _PLAN]
    return route if plans == [plan] else None


def _fuse(graph, route, plan, fake_mode):
    emit = Emitter(graph, route, fake_mode, PASS)
    with graph.inserting_before(route):
        args = tuple(route.args) + (None,) * (9 - len(route.args))     # route's group_fill may be left out
        fused = emit.op(torch.ops.moec.route_plan.default, *args[:8], plan.args[1], args[8])
        outputs = [emit.item(fused, i) for i in range(5)]
    for node, first in ((route, 0), (plan, 2)):
        for item in list(node.users):
            item.replace_all_uses_with(outputs[first + item.args[1]])
            graph.erase_node(item)
    graph.erase_node(plan)
    graph.erase_node(route)
