"""Expert weights the graph computes instead of reading them: found, valued, and LoRA recognised.

A layer may read its experts' weights through arithmetic on parameters: PEFT's LoRA on 3D expert
parameters computes W + s * L @ R every forward (traced as `baddbmm(W, L, R, alpha=s)`), other
code adds, scales or mixes weights. That arithmetic reads no token and no routing decision, so it
is not part of the layer: it stays in the graph, and its result enters the layer as if it were a
weight input (the region's `real` values get its value on the real parameters).

    weight-only = region nodes that read neither the tokens nor the router logits
    boundary    = weight-only nodes that a token-dependent node of the region reads
    producer    = a boundary node's root through views and casts, when that root is a float
                  tensor the graph computes (not a graph input)

`lora_form` reads a producer as W + s * L @ R (L (E, N, r), R (E, r, K)), so the rewrite can hand
W, L and R to moec.experts and never form the merged weight.
"""
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph import is_tensor, op_name, value

# Ops that re-read a tensor without arithmetic worth keeping out of the layer: the walk from a
# boundary node back to its producer passes through them (HF transposes, `W[e]`, `.to(dtype)`).
_PASS_THROUGH = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "narrow",
                 "select", "chunk", "split", "unflatten", "flatten", "t", "T", "contiguous", "detach",
                 "unbind", "getitem", "to", "type", "float", "half", "bfloat16", "double"}


@dataclass(frozen=True)
class LoraForm:
    """weight = base + scale * lhs @ rhs, per expert: base (E, N, K), lhs (E, N, r), rhs (E, r, K).
    `nodes`: the weight and the nodes computing its delta (bmm, scaling): what merging costs."""
    weight: fx.Node
    base: fx.Node
    lhs: fx.Node
    rhs: fx.Node
    scale: float
    nodes: frozenset = frozenset()


def split_producers(gm, dg, nodes, x, logits, real):
    """-> (region nodes without the weight computations, {node: real value} for every node the
    smaller region now reads that was computed in it, [producers]).

    Nothing is split off when no producer exists: the region is returned as it came."""
    # everything computed from what the tokens or the logits are made of (a zeros_like(hidden))
    data = dg.forward_slice(dg.backward_slice([x, logits]))
    weight_only = {n for n in nodes if n not in data}
    written = {dg.root[m] for m in dg.mutations}
    producers = []
    for n in dg.sorted(weight_only):
        if not any(u in nodes and u not in weight_only for u in dg.users[n]):
            continue
        root = n
        while op_name(root) in _PASS_THROUGH and isinstance(root.args[0], fx.Node) and \
                (root.args[0] in weight_only or root.args[0] in real):
            root = root.args[0]
        if root in producers or root.op == "placeholder" or not _is_float_tensor(root) or value(root).dim() < 2:
            continue
        reads = dg.backward_slice([root])
        # a weight is made from parameters (a static zeros buffer is not), and nothing writes it
        if not any(i in real and real[i].dim() >= 2 for i in reads) or reads & (written | dg.mutations):
            continue
        producers.append(root)
    if not producers:
        return nodes, {}, []
    removed = dg.backward_slice(producers) & set(nodes)
    kept = set(nodes) - removed
    now_read = {d for n in kept for d in dg.deps[n]} & removed
    return kept, evaluate(gm, dg, now_read, real), producers


def evaluate(gm, dg, targets, real):
    """Values of `targets` (nodes that read only graph inputs and constants) on the real inputs."""
    # A value `real` holds already is not recomputed: a sharded weight's stand-in (see detect's
    # `_stand_in`) recomputed would gather the shards, a collective at compile time.
    known = {t: real[t] for t in targets if t in real}
    targets = dg.sorted(set(targets) - known.keys())
    needed = dg.sorted(dg.backward_slice(targets))
    g, env = fx.Graph(), {}
    leaves = [n for n in needed if n.op in ("placeholder", "get_attr")]
    for k, n in enumerate(leaves):
        env[n] = g.placeholder(f"in_{k}")
    for n in needed:
        if n not in env:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[t] for t in targets))
    with torch.no_grad():
        out = fx.GraphModule(gm, g)(*[real[n].detach() for n in leaves])
    return {**known, **dict(zip(targets, out))}


def lora_form(node) -> LoraForm | None:
    """`node` read as base + scale * lhs @ rhs with 3D operands sharing the expert dim, else None.
    Accepts `baddbmm(W, L, R, alpha=s)` (beta 1) and `W + s * bmm(L, R)` / `W + bmm(L, R) * s` /
    `W + matmul(L, R) / c` in either operand order."""
    name = op_name(node)
    if name == "baddbmm":
        args = list(node.args) + [None] * 3
        w, lhs, rhs = (args[i] if args[i] is not None else node.kwargs.get(k)
                       for i, k in enumerate(("input", "batch1", "batch2")))
        if node.kwargs.get("beta", 1) != 1 or len(node.args) > 3:
            return None
        scale = node.kwargs.get("alpha", 1)
        return _checked(node, w, lhs, rhs, scale, ())
    if name == "add" and len(node.args) == 2 and not node.kwargs:
        for w, delta in (node.args, node.args[::-1]):
            found = _scaled_product(delta)
            if found is not None and isinstance(w, fx.Node):
                return _checked(node, w, *found)
    return None


def _scaled_product(node, scale=1.0, chain=()):
    """(lhs, rhs, scale, chain nodes) for `s * bmm(lhs, rhs)`, `bmm(...) * s`, `bmm(...) / s`."""
    if not isinstance(node, fx.Node):
        return None
    name, chain = op_name(node), chain + (node,)
    if name in ("bmm", "matmul") and len(node.args) == 2 and not node.kwargs:
        return node.args[0], node.args[1], scale, chain
    if name in ("mul", "truediv", "div") and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if name == "mul" and isinstance(a, (int, float)):
            a, b = b, a
        if isinstance(b, (int, float)) and not isinstance(b, bool):
            return _scaled_product(a, scale * b if name == "mul" else scale / b, chain)
    return None


def _checked(node, w, lhs, rhs, scale, chain):
    if not all(isinstance(t, fx.Node) and _is_float_tensor(t) and value(t).dim() == 3 for t in (w, lhs, rhs)):
        return None
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return None
    (E, N, K), (E1, N1, r), (E2, r2, K2) = (value(t).shape for t in (w, lhs, rhs))
    if not (E == E1 == E2 and N == N1 and K == K2 and r == r2) or value(node).shape != value(w).shape:
        return None
    if len({value(t).dtype for t in (w, lhs, rhs, node)}) != 1:
        return None
    return LoraForm(node, w, lhs, rhs, float(scale), frozenset((node,) + tuple(chain)))


def _is_float_tensor(node) -> bool:
    return is_tensor(node) and value(node).is_floating_point()

