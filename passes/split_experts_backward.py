"""Pass `split_experts_backward`: in a backward graph, split `moec.experts_backward` into its
input-gradient half and its weight-gradient half where an all-to-all sends the input gradient.

Expects: an AOT autograd backward graph (fake values in node.meta["val"]) holding
`experts_backward(grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit, needs[, pre])`
nodes read through getitem (what ep_experts' local experts trace to; pre: the pre-activations
`experts_save` kept in training, which the rows half then reads instead of recomputing).
Guarantees: each such node whose dx reaches an `_c10d_functional.all_to_all_single` (the
dispatch's backward), whose layout has no LoRA factors and which computes some weight gradient,
becomes, in the same place,

    dx, h, du, dg = experts_backward_rows(grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit[, pre])
    grads         = experts_wgrad(grad_y, x, src, offsets, k, h, du, dg, weights, layout, needs)

with every reader of the old outputs reading the same values from these (the two ops compute
what the fused one does with the same kernels: tests/codegen/test_experts_split.py). The weight
half's results flow only into parameter gradients, so `schedule_wgrad` can then run it under the
all-to-all that sends dx: Lancet's main backward overlap for MoE layers, where the experts'
weight gradients are about 6 of the backward's 16 S*H*F flops (gated). The cost: h, du and dg
(3 x S x F) live from one half to the other instead of inside one op; schedule_wgrad's memory
bound counts them.
Must not change: any other node; an experts_backward whose dx feeds no all-to-all (nothing to
hide behind) or that has LoRA factors (their gradients need more than h, du, dg) stays fused.
"""
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.codegen import layout as layouts

from .node_costs import ALL_TO_ALL, val

PASS = "split_experts_backward"
_FUSED = torch.ops.moec.experts_backward.default
_ROWS = torch.ops.moec.experts_backward_rows.default
_WGRAD = torch.ops.moec.experts_wgrad.default


@dataclass(frozen=True)
class SplitReport:
    split: tuple = ()       # names of the experts_backward nodes split
    kept: tuple = ()        # (name, why it stayed fused)

    def text(self) -> str:
        lines = [f"{PASS}: {len(self.split)} split" + (f" ({', '.join(self.split)})" if self.split else "")]
        lines += [f"  {name} stays fused: {why}" for name, why in self.kept]
        return "\n".join(lines)


def split_experts_backward(gm: fx.GraphModule) -> tuple:
    split, kept = [], []
    for node in [n for n in gm.graph.nodes if n.target is _FUSED]:
        why = _why_not(node)
        if why:
            kept.append((node.name, why))
            continue
        _split(gm.graph, node)
        split.append(node.name)
    if split:
        gm.graph.lint()
        gm.recompile()
    return gm, SplitReport(tuple(split), tuple(kept))


def _why_not(node) -> str:
    grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit, needs, *_pre = node.args
    if layouts.has_lora(layout):
        return "LoRA factors"
    if not any(needs):
        return "no weight gradient to compute"
    getters = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if len(getters) != len(node.users):
        return "an output is read other than through getitem"
    if 0 not in getters or not _reaches_all_to_all(getters[0]):
        return "its input gradient reaches no all-to-all"
    return ""


def _reaches_all_to_all(node, limit: int = 64) -> bool:
    """Whether an all_to_all_single is among the first `limit` nodes downstream of `node`."""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n.target is ALL_TO_ALL:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return False


def _split(graph, node):
    grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit, needs, *pre = node.args
    fake_mode = detect_fake_mode([val(a) for a in (grad_y, x)])
    args = fx.node.map_aggregate(node.args, val)
    with graph.inserting_before(node):     # pre: experts_save's pre-activations, read by the rows half
        rows = graph.call_function(_ROWS, (grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit,
                                           *pre))
        with fake_mode:
            rows.meta["val"] = _ROWS(*args[:10], *args[11:])
        dx, h, du, dg = (_getitem(graph, rows, i) for i in range(4))
        wgrad = graph.call_function(_WGRAD, (grad_y, x, src, offsets, k, h, du, dg, weights, layout, needs))
        with fake_mode:
            wgrad.meta["val"] = _WGRAD(*args[:5], *(val(t) for t in (h, du, dg)), args[5], layout, needs)
    for meta in (rows.meta, wgrad.meta):
        meta.update(_provenance(node))
        meta["moec_pass"] = PASS
    for user in list(node.users):
        i = user.args[1]
        user.replace_all_uses_with(dx if i == 0 else _getitem_after(graph, wgrad, i - 1, user))
        graph.erase_node(user)
    graph.erase_node(node)


def _getitem(graph, parent, i):
    n = graph.call_function(operator.getitem, (parent, i))
    n.meta["val"] = parent.meta["val"][i]
    return n


def _getitem_after(graph, parent, i, old):
    with graph.inserting_before(old):
        n = _getitem(graph, parent, i)
    n.meta.update(_provenance(old))
    return n


def _provenance(node) -> dict:
    # where the node came from, for stack traces and dumps; not what describes its values or
    # inputs (eager_input_vals, tensor_meta belong to the old op's schema)
    keep = ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "seq_nr", "original_aten")
    return {k: v for k, v in node.meta.items() if k in keep}
