"""Pass `fuse_router`: `route_plan(linear(x, W, b), ...)` -> one `moec.router_plan` op.

Expects: `moec.route_plan` nodes made by `fuse_routing`.
Guarantees: with codegen/router_plan_op.py's ENABLED (MOEC_ROUTER_PLAN=1; off by default: slower
on an H100, see router_plan_kernel.py), each route_plan whose logits are a linear layer (`linear(x, W, b)`, `x @ W.t()`,
`x @ W.T`) of a 2-D x and a 2-D W of x's dtype is replaced, with that linear, by

    logits, w, ids, offsets, src, inv = moec.router_plan(x, W, b, bias, k, scoring, renorm, scale, n_group,
                                                         topk_group, E, group_fill)

every other reader of the logits (an auxiliary loss, a returned router_logits) reading the op's.
At decode sizes the op computes the logits, routes and plans in one launch. Others stay, named
in the report with the reason.
Must not change: any other node; results (the op computes what the pair does, gradients too; its
logits are a GEMM's in another summation order, as any two GEMMs' may differ in the last bit).
"""
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.codegen import router_plan_op

from .graph import Emitter, value

PASS = "fuse_router"
_ROUTE_PLAN = torch.ops.moec.route_plan.default
_LINEARS = (torch._C._nn.linear, torch.ops.aten.linear.default)
_MATMULS = (operator.matmul, torch.matmul)


@dataclass(frozen=True)
class FuseRouterReport:
    fused: tuple = ()       # route_plan node names whose router linear came with them
    kept: tuple = ()        # (route_plan node name, why it stayed apart)
    off: bool = False       # not ENABLED: nothing looked at

    def log_lines(self):
        return ([f"{name}: router linear + route_plan -> moec.router_plan" for name in self.fused]
                + [f"{name}: kept apart: {why}" for name, why in self.kept])


def fuse_router(gm: fx.GraphModule, ctx) -> tuple:
    if not router_plan_op.ENABLED:
        return gm, FuseRouterReport(off=True)
    fused, kept = [], []
    for owner in [m for m in gm.modules() if isinstance(m, fx.GraphModule)]:
        changed = False
        for node in [n for n in owner.graph.nodes if n.target is _ROUTE_PLAN]:
            why = _why_not(node.args[0])
            anchor = None if why else _where(node)
            if anchor is None:
                kept.append((node.name, why or "the logits are read before the score bias route_plan reads is "
                                               "computed"))
                continue
            _fuse(owner.graph, node, anchor, ctx.fake_mode)
            fused.append(node.name)
            changed = True
        if changed:
            owner.graph.lint()
            owner.recompile()
    return gm, FuseRouterReport(tuple(fused), tuple(kept))


def _transposed(node):
    """W where node is `W.t()` or `W.T`, else None."""
    if node.op == "call_method" and node.target == "t" and len(node.args) == 1:
        return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("T",):
        return node.args[0]
    return None


def _linear_args(linear):
    """(x, W, b) of `linear(x, W, b)`, or of `x @ W.t()` / `torch.matmul(x, W.T)` with b None; else None."""
    if not (isinstance(linear, fx.Node) and linear.op == "call_function"):
        return None
    if linear.target in _LINEARS:
        x, w = linear.args[:2]
        return x, w, linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if linear.target in _MATMULS and len(linear.args) == 2 and isinstance(linear.args[1], fx.Node):
        w = _transposed(linear.args[1])
        return None if w is None else (linear.args[0], w, None)
    return None


def _why_not(logits) -> str:
    args = _linear_args(logits)
    if args is None:
        return "its logits are not a linear layer's output (linear(x, W, b), x @ W.t())"
    x, w, b = (value(a) if isinstance(a, fx.Node) else a for a in args)
    if not all(isinstance(t, torch.Tensor) for t in (x, w)) or not (b is None or isinstance(b, torch.Tensor)):
        return "the router's linear layer has no example values"
    if x.dim() != 2 or w.dim() != 2:
        return f"the router's input is {x.dim()}-D and its weight {w.dim()}-D (the op takes (T, H) and (E, H))"
    if any(t is not None and t.dtype != x.dtype for t in (w, b)):
        return "the router's weight or bias has another dtype than its input"
    return ""


def _where(route_plan):
    """The node the op goes before: the linear, where route_plan's other inputs (a score bias) are
    ready by then, so every reader of the logits comes after it; else route_plan, where no other
    reader of the logits comes before it; else None."""
    linear = route_plan.args[0]
    order = {n: i for i, n in enumerate(route_plan.graph.nodes)}
    inputs = [a for a in route_plan.args[1:] if isinstance(a, fx.Node)]
    if all(order[a] < order[linear] for a in inputs):
        return linear
    if all(order[u] >= order[route_plan] for u in linear.users):
        return route_plan
    return None


def _fuse(graph, route_plan, anchor, fake_mode):
    """The op before anchor (_where's node), in place of route_plan and its linear layer."""
    linear = route_plan.args[0]
    emit = Emitter(graph, route_plan, fake_mode, PASS)
    args = tuple(route_plan.args) + (None,) * (10 - len(route_plan.args))     # group_fill may be left out
    with graph.inserting_before(anchor):
        fused = emit.op(torch.ops.moec.router_plan.default, *_linear_args(linear), *args[1:])
        outputs = [emit.item(fused, i) for i in range(6)]
    for item in list(route_plan.users):
        item.replace_all_uses_with(outputs[1 + item.args[1]])
        graph.erase_node(item)
    graph.erase_node(route_plan)
    transposed = linear.args[1] if linear.target in _MATMULS else None
    linear.replace_all_uses_with(outputs[0])
    graph.erase_node(linear)
    if transposed is not None and not transposed.users:
        graph.erase_node(transposed)      # x @ W.t()'s transpose, read by nothing else now
