"""The neighbourhood `chunk_tokens` chunks around an expert-parallel MoE layer, on random chains of
token-local and token-mixing ops before and after it (FX graphs with example values, no process
group): no op that mixes tokens is ever chunked, every chunked node computes the same in other
chunk counts than the one it was checked with, and a chain that is token-local all the way is
chunked all the way. The same cut in whole sequences (units B): ops that mix only a sequence's
tokens are chunked then, ops that mix sequences never."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from budget import examples
from fx_values import traced
from moec.codegen import layout as layouts
from moec.passes import token_locality as tl
from moec.passes.chunk_tokens import _find
from moec.passes.graph import op_name
from moec.runtime.expert_parallel import ep_experts

torch.fx.wrap("ep_experts")

B, S, H, E, F_ = 2, 3, 8, 4, 6
T = B * S
LAYOUT = layouts.pack([(0, False, None), None, (1, False, None), None, None, None])[1]

LOCAL = {
    "scale": lambda h, p: h * p["w"],
    "silu": lambda h, p: F.silu(h),
    "linear": lambda h, p: F.linear(h, p["W"]),
    "norm": lambda h, p: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * p["w"],
    "residual": lambda h, p: h + p["h0"],
    "views": lambda h, p: h.view(T, H).view(B, S, 2, H // 2).transpose(2, 3).reshape(B, S, H),
    "halves": lambda h, p: _swap_halves(h),
}
# each mixes tokens in the node its predicate picks: that node must never be chunked by tokens;
# the last field: whether it mixes only the tokens of one sequence (then it is chunked by sequences)
MIXING = {
    "cumsum": (lambda h, p: h.cumsum(1), lambda n: op_name(n) == "cumsum", True),
    "seq_mean": (lambda h, p: h + h.mean(1, keepdim=True), lambda n: op_name(n) == "mean" and n.args[1] == 1, True),
    "roll": (lambda h, p: h.roll(1, 1), lambda n: op_name(n) == "roll", False),   # roll is not a rule's op
    "attention": (lambda h, p: torch.softmax(h @ h.transpose(1, 2), -1) @ h, lambda n: op_name(n) == "matmul", True),
    "sdpa": (lambda h, p: F.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None], is_causal=True)[:, 0],
             lambda n: op_name(n) == "scaled_dot_product_attention", True),
    "batch_flip": (lambda h, p: h.flip(0), lambda n: op_name(n) == "flip", False),
    "batch_mean": (lambda h, p: h + h.mean(0, keepdim=True), lambda n: op_name(n) == "mean" and n.args[1] == 0,
                   False),
}


def _swap_halves(h):
    a, b = h.split(H // 2, dim=-1)
    return torch.cat((b, a), dim=-1)


ops = st.lists(st.sampled_from(sorted(LOCAL) + sorted(MIXING)), max_size=4)


def _apply(names, h, p):
    for name in names:
        h = LOCAL[name](h, p) if name in LOCAL else MIXING[name][0](h, p)
    return h


def _layer(before, after):
    def fn(h0, w, W, router_w, w_up, w_down):
        p = {"w": w, "W": W, "h0": h0}
        h = _apply(before, h0, p)
        x = h.reshape(-1, H)
        weights, ids = torch.ops.moec.route.default(F.linear(x, router_w), None, 2, "softmax", True, 1.0, 1, 1)
        offsets, src, inv = torch.ops.moec.plan.default(ids, E)
        y = ep_experts(x, src, offsets, 2, [w_up, w_down], LAYOUT, "silu", 0.0, 0.0, "0")
        out = torch.ops.moec.combine.default(y, inv, weights).view(B, S, H)
        return _apply(after, out, p)
    return fn


@settings(max_examples=examples(15))
@given(before=ops, after=ops, units=st.sampled_from([T, B]))
def test_random_neighbourhoods(before, after, units):
    p = lambda *s: torch.randn(*s) / s[-1] ** 0.5   # noqa: E731
    gm = traced(_layer(before, after), torch.randn(B, S, H), p(H), p(H, H), p(E, H), p(E, F_, H), p(E, H, F_))
    [ep] = [n for n in gm.graph.nodes if n.target is ep_experts]
    layer = _find(gm, ep, 2, capacity=False, units=units)
    chunked = [*layer.pre, *layer.side, *layer.post]
    mixing = lambda name: name in MIXING and (units == T or not MIXING[name][2])   # noqa: E731
    mixes = [MIXING[name][1] for name in before + after if mixing(name)]
    assert not [n for n in chunked if any(m(n) for m in mixes)], (before, after, [n.name for n in chunked])
    for n in (n for n in chunked if layer.rules[n].kind != "getitem"):   # items of a checked tuple op
        for k, seed in ((2, 1), (units, 2)):
            assert tl.verify(n, layer.rules[n], units, k=k, seed=seed), n
    if not any(map(mixing, before)):                 # local up to the graph inputs: all of it chunked
        assert set(layer.pre) == _ancestors(layer), (before, [n.name for n in layer.pre])
    if not any(map(mixing, after)):                  # local down to the output: all of it chunked
        assert set(layer.post) == _descendants(layer), (after, [n.name for n in layer.post])


def _ancestors(layer):
    """Every op the layer's input and router logits come from."""
    seen, todo = set(), [layer.x, layer.route.args[0]]
    while todo:
        n = todo.pop()
        if n not in seen and n.op not in ("placeholder", "get_attr"):
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _descendants(layer):
    """Every op after the combine."""
    seen, todo = set(), list(layer.combine.users)
    while todo:
        n = todo.pop()
        if n not in seen and n.op != "output":
            seen.add(n)
            todo.extend(n.users)
    return seen
