"""Predicted seconds and bytes of one node of an ATen FX graph (an AOT forward or backward graph).

Read by passes that schedule compute against communication; the rates come from
`moec.runtime.cost_model` (a `ComputeModel` and an `AllToAllModel`), so nothing here measures.

    costs = NodeCosts(compute, a2a, rank, world_size)
    costs.compute_s(node)   launch + roofline: flops from torch's flop-counter formulas (and
                            moec's experts ops), bytes = tensors read + written; views, getitem,
                            symbolic-int ops, collectives and waits cost nothing on the compute
                            stream
    costs.comm_s(node)      an `_c10d_functional.all_to_all_single` start: the all-to-all model
                            over this rank's send splits
    size(v)                 a concrete int for an int or SymInt
Sizes unknown at compile time (a dropless all-to-all's splits are unbacked SymInts) count as
UNKNOWN_SIZE, the number Inductor's own estimates use (config.unbacked_symint_fallback).
"""
import operator

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.codegen import layout as layouts

UNKNOWN_SIZE = 8192

ALL_TO_ALL = torch.ops._c10d_functional.all_to_all_single.default
WAIT = torch.ops._c10d_functional.wait_tensor.default


class NodeCosts:
    """Seconds per node; `compute` a ComputeModel, `a2a` an AllToAllModel (None: all-to-alls take
    no time), `rank` this rank's place in the group and `world_size` its size."""

    def __init__(self, compute, a2a=None, rank: int = 0, world_size: int = 1, source: str = ""):
        self.compute, self.a2a, self.rank, self.world_size = compute, a2a, rank, world_size
        self.source = source       # where the rates came from, for reports
        self._cache = {}

    def compute_s(self, node: fx.Node) -> float:
        if node not in self._cache:
            self._cache[node] = self._compute_s(node)
        return self._cache[node]

    def _compute_s(self, node):
        if node.op != "call_function" or is_free(node) or is_collective(node) or node.target is WAIT:
            return 0.0
        return self.compute.time(flops(node), moved_bytes(node))

    def comm_s(self, node: fx.Node) -> float:
        if node.target is not ALL_TO_ALL or self.a2a is None:
            return 0.0
        rows_in = node.args[0]
        total = nbytes(val(rows_in))
        in_splits = node.args[2] if len(node.args) > 2 else None
        if not in_splits:
            W = max(1, self.world_size)
            return self.a2a.time([total / W] * W, rank=min(self.rank, W - 1))
        rows = [size(val(s)) for s in in_splits]
        per_row = total / max(1, sum(rows))
        return self.a2a.time([r * per_row for r in rows], rank=min(self.rank, len(rows) - 1))


def val(node):
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else node


def size(v) -> int:
    """A concrete int for an int or SymInt: its hint, else UNKNOWN_SIZE for each unbacked symbol."""
    if not isinstance(v, torch.SymInt):
        return int(v)
    if v.node.hint is not None:
        return int(v.node.hint)
    expr, env = v.node.expr, v.node.shape_env
    backed = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val   # renamed in 2.13
    known = {s: backed.get(s, UNKNOWN_SIZE) for s in expr.free_symbols}
    try:
        return max(0, int(expr.xreplace(known)))
    except (TypeError, ValueError):
        return UNKNOWN_SIZE


def nbytes(v) -> int:
    """Bytes of a tensor value (0 for anything else; a tuple or list: the sum)."""
    if isinstance(v, torch.Tensor):
        n = 1
        for d in v.shape:
            n *= size(d)
        return n * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(nbytes(x) for x in v)
    return 0


def tensors(v) -> list:
    """The tensors in a value: itself, or those inside (nested) tuples and lists."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in tensors(x)]
    return []


def is_collective(node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "_c10d_functional" and target is not WAIT


def is_view(node) -> bool:
    """An op whose every result aliases an input without writing it (t, view, permute, slice...)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def is_free(node) -> bool:
    """Costs no kernel: a view, an output of a multi-output op, or arithmetic on sizes."""
    if node.target is operator.getitem or is_view(node):
        return True
    v = val(node)
    return not isinstance(v, (torch.Tensor, tuple, list)) or \
        (isinstance(v, (tuple, list)) and not any(isinstance(x, torch.Tensor) for x in v))


def moved_bytes(node) -> int:
    """Tensors read (each input once) plus tensors written."""
    read = sum(nbytes(val(n)) for n in node.all_input_nodes if isinstance(val(n), torch.Tensor))
    return read + nbytes(val(node))


def flops(node) -> float:
    target = node.target
    if target in _MOEC_FLOPS:
        return float(_MOEC_FLOPS[target](node))
    formula = flop_registry.get(getattr(target, "overloadpacket", None))
    if formula is None:
        return 0.0
    args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), val)
    try:
        return float(size(formula(*args, **kwargs, out_val=val(node))))
    except Exception:   # a formula that wants what this node does not record: count its bytes only
        return 0.0


def _experts_dims(node):
    """(S copies, H, F, projections) of a moec.experts / experts_backward node."""
    at = 1 if node.target is _EXPERTS_BWD else 0       # experts_backward takes grad_y first
    x, src, weights, layout = val(node.args[at]), val(node.args[at + 1]), node.args[at + 4], node.args[at + 5]
    parsed = layouts.parse(layout)
    down = parsed["w_down"]
    base = val(weights[down.index])                   # (E, H, F), or (E, F, H) read transposed
    F = size(base.shape[1] if down.transpose else base.shape[2])
    return size(src.shape[0]), size(x.shape[1]), F, 3 if "w_gate" in parsed else 2


def _experts_flops(node):
    S, H, F, p = _experts_dims(node)
    return 2.0 * S * H * F * p


def _experts_backward_flops(node):
    # recompute up/gate (not when given experts_save's pre-activations, args[11]), dh = dy W_down,
    # rows = du W_up (+ dg W_gate), every weight's gradient
    S, H, F, p = _experts_dims(node)
    recompute = 0 if len(node.args) > 11 and node.args[11] is not None else p - 1
    return 2.0 * S * H * F * (recompute + (p - 1) + 1 + p)


_EXPERTS_BWD = torch.ops.moec.experts_backward.default
_MOEC_FLOPS = {torch.ops.moec.experts.default: _experts_flops, torch.ops.moec.experts_save.default: _experts_flops,
               _EXPERTS_BWD: _experts_backward_flops}
