"""Capacity routing in a detected region: the capacity each expert has, and the router forms
that can explain it, for `identify` to prove numerically.

A capacity gate compares each copy's position among its expert's copies (a cumulative sum over
one-hot expert masks) with a scalar: `loc < capacity` on 0-based positions (DeepSpeed, GShard)
or `priority <= capacity` on 1-based ones (Switch). Both keep the first `capacity` copies, so
the scalar is the capacity either way. It is a Python int, or a SymInt node when the token count
is symbolic (capacity = f(T)), which the rewrite keeps in the graph and passes to moec's op.
"""
import itertools

from .graph import is_int, op_name
from .region import Router

_COMPARE = {"lt": 0, "le": 0, "ge": 1, "gt": 1}   # which argument holds the positions


def find_capacity(nodes):
    """The capacity scalar (int or fx.Node) the region compares cumsum positions with, or None."""
    cumsums = {n for n in nodes if op_name(n) == "cumsum"}
    found = []
    for n in nodes:
        if op_name(n) not in _COMPARE or len(n.args) != 2:
            continue
        positions, scalar = n.args if _COMPARE[op_name(n)] == 0 else n.args[::-1]
        if _derives_from(positions, cumsums) and is_int(scalar):
            found.append(scalar)
    return found[0] if found and all(s is found[0] or s == found[0] for s in found) else None


def capacity_routers(nodes, capacity, top_k):
    """Router forms a capacity gate may compute, most likely first."""
    names = {op_name(n) for n in nodes}
    scorings = ["softmax"] if "softmax" in names else ["sigmoid"] if "sigmoid" in names else []
    for scoring, renorm, order in itertools.product(scorings, (True, False), ("choice_major", "token_major")):
        yield Router(scoring=scoring, top_k=top_k, renormalize=renorm, capacity=capacity, capacity_order=order)


def selections(router_nodes):
    """k of a router built from repeated argmax (top-2 as argmax, mask, argmax again)."""
    topks = [n for n in router_nodes if op_name(n) == "topk"]
    if topks:
        k = topks[-1].args[1] if len(topks[-1].args) > 1 else topks[-1].kwargs.get("k")
        return k if isinstance(k, int) else 0
    return sum(op_name(n) == "argmax" for n in router_nodes)


def _derives_from(node, sources, depth=6):
    todo, seen = [(node, 0)], set()
    while todo:
        n, d = todo.pop()
        if n in sources:
            return True
        if n in seen or d > depth or not hasattr(n, "all_input_nodes"):
            continue
        seen.add(n)
        todo.extend((a, d + 1) for a in n.all_input_nodes)
    return False
