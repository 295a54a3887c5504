"""What each node of a detected region does: router, dispatch, experts or combine.

Read by the dumps (pictures, node tags); the rewrite does not need it. Derived from the region
record and the dependency graph, never stored on the region, so the contract stays one record.

    experts  = region nodes computed from the expert weights, before they meet the routing weights
    router   = the top-k and the float scores and weights computed from the logits alone
    combine  = the output, its in-place buffer, and whatever mixes expert rows with routing weights
    dispatch = the rest: integer and mask work on the expert ids, gathering tokens by expert
"""
from .graph import DepGraph, op_name, value

ROLES = ("router", "dispatch", "experts", "combine")


def node_roles(graph, region) -> dict:
    """node -> role for every node in `region.nodes`."""
    dg = DepGraph.build(graph)
    inside = set(region.nodes)
    weights = {d for n in region.nodes for d in dg.deps[n]} - inside - {region.x, region.logits}
    expert_side = dg.forward_slice(weights, stop={region.logits}) & inside
    token_side = dg.forward_slice({region.x} | weights, stop={region.logits}) & inside
    anchors = {n for n in inside - token_side if op_name(n) in ("topk", "max", "argmax") and _float_in(n)}
    picks = {u for a in anchors for u in a.users if op_name(u) == "getitem"} & inside
    scores = dg.backward_slice(anchors, stop={region.logits}) & inside
    weights_flow = _float_flow(dg, {p for p in picks if _is_float(p)} | {a for a in anchors if _is_float(a)},
                               inside - token_side)
    router = anchors | picks | scores | weights_flow
    mixed = {n for n in expert_side if dg.backward_slice([n]) & weights_flow}
    roles = {}
    for n in region.nodes:
        if n is region.output or n in region.aliases or n in mixed:
            roles[n] = "combine"
        elif n in expert_side:
            roles[n] = "experts"
        elif n in router:
            roles[n] = "router"
        else:
            roles[n] = "dispatch"
    return roles


def _float_flow(dg, seeds, allowed):
    """Float nodes reachable from `seeds` through float nodes only: the routing weights' path."""
    seen, todo = set(), list(seeds)
    while todo:
        n = todo.pop()
        if n in seen or n not in allowed or not _is_float(n):
            continue
        seen.add(n)
        todo.extend(dg.users[n])
    return seen


def _is_float(node) -> bool:
    v = value(node)
    return bool(getattr(v, "is_floating_point", lambda: False)())


def _float_in(node) -> bool:
    return bool(node.args) and _is_float(node.args[0])
