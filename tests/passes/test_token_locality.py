"""passes/token_locality.py and the neighbourhood `chunk_tokens` chunks, on small FX graphs with
example values (no process group): token-local ops are found and check out on random inputs;
ops that mix tokens (attention, sums and scans over tokens, an aux loss) are never chunked, and
a wrong rule is caught by the check."""

import pytest
import torch
import torch.nn.functional as F

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.codegen import layout as layouts
from moec.passes import token_locality as tl
from moec.passes.chunk_tokens import _find
from moec.passes.graph import op_name
from fx_values import traced
from moec.runtime.expert_parallel import ep_experts

torch.fx.wrap("ep_experts")

B, S, H, E, F_ = 2, 5, 8, 4, 6
T = B * S


def node(gm, name):
    return next(n for n in gm.graph.nodes if op_name(n) == name)


def local(gm, name):
    n = node(gm, name)
    r = tl.rule(n, T)
    return r is not None and tl.verify(n, r, T)


X = torch.randn(B, S, H)


@pytest.mark.parametrize("fn, name", [
    (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, "rsqrt"),   # RMSNorm
    (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, "mean"),
    (lambda x, w: F.linear(x, w.expand(H, H)), "linear"),
    (lambda x, w: x.view(-1, H) + w, "view"),
    (lambda x, w: x.view(B, S, 2, H // 2).transpose(2, 3), "transpose"),   # non-token dims
    (lambda x, w: x[..., :3] * 2, "getitem"),
    (lambda x, w: torch.cat([x, x * w], dim=-1), "cat"),
    (lambda x, w: x.softmax(-1), "softmax"),
    (lambda x, w: x * w[None, None, :], "mul"),                          # broadcast over the tokens
    (lambda x, w: x + X[:1, :, :1], "add"),                              # (1, S, 1): read as rows
], ids=["norm-rsqrt", "norm-mean", "linear", "view", "transpose", "index", "cat", "softmax", "broadcast",
        "token-carrying-constant"])
def test_token_local_ops(fn, name):
    assert local(traced(fn, X, torch.randn(H)), name)


@pytest.mark.parametrize("fn, name", [
    (lambda x, w: torch.softmax(x @ x.transpose(1, 2), -1) @ x, "matmul"),                     # attention
    (lambda x, w: F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None]), "scaled_dot_product_attention"),
    (lambda x, w: x.sum(0), "sum"),                                                            # over tokens
    (lambda x, w: x.mean(dim=(0, 1)), "mean"),
    (lambda x, w: x.cumsum(1), "cumsum"),
    (lambda x, w: x.softmax(1), "softmax"),
    (lambda x, w: x.transpose(0, 1), "transpose"),
    (lambda x, w: x[:, 1:], "getitem"),
    (lambda x, w: x.roll(1, 1), "roll"),
    (lambda x, w: x.flip(1), "flip"),
], ids=["attention", "sdpa", "sum-tokens", "mean-all", "cumsum-tokens", "softmax-tokens", "transpose-tokens",
        "index-tokens", "roll", "flip"])
def test_token_mixing_ops_are_not_local(fn, name):
    assert not local(traced(fn, X, torch.randn(H)), name)


def local_per_sequence(gm, name):
    n = node(gm, name)
    r = tl.rule(n, B)
    return r is not None and tl.verify(n, r, B, k=B)


MASK = torch.rand(S, S) > 0.3


@pytest.mark.parametrize("fn, name", [
    (lambda x, w: torch.softmax(x @ x.transpose(1, 2), -1) @ x, "matmul"),
    (lambda x, w: torch.bmm(x, x.transpose(1, 2)), "bmm"),
    (lambda x, w: F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None], is_causal=True),
     "scaled_dot_product_attention"),
    (lambda x, w: F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None], attn_mask=MASK),
     "scaled_dot_product_attention"),                                   # a mask broadcast over the batch
    (lambda x, w: F.dropout(x, 0.0, True) * 2, "dropout"),
    (lambda x, w: x.sum(1), "sum"),
    (lambda x, w: x.cumsum(1), "cumsum"),
    (lambda x, w: x.softmax(1), "softmax"),
    (lambda x, w: x[:, 1:], "getitem"),
    (lambda x, w: x.reshape(B * S, H) * w, "mul"),                        # S rows per sequence
    (lambda x, w: x.reshape(B * S * 2, H // 2).relu(), "relu"),          # 2 S rows per sequence
], ids=["attention", "bmm", "sdpa-causal", "sdpa-mask", "dropout-off", "sum-sequence", "cumsum-sequence",
        "softmax-sequence", "index-sequence", "flat-rows", "split-rows"])
def test_sequence_local_ops(fn, name):
    """In batch mode (units: the B sequences) ops that mix a sequence's tokens are local."""
    assert local_per_sequence(traced(fn, X, torch.randn(H)), name)


@pytest.mark.parametrize("fn, name", [
    (lambda x, w: x.sum(0), "sum"),
    (lambda x, w: x.flip(0), "flip"),
    (lambda x, w: x.transpose(0, 1) * 2, "transpose"),
    (lambda x, w: x[1:], "getitem"),
    (lambda x, w: x @ x[:1].transpose(1, 2), "matmul"),                 # batch broadcast: one sequence for all
    (lambda x, w: F.scaled_dot_product_attention(*[x.reshape(1, 1, B * S, H)] * 3), "scaled_dot_product_attention"),
    (lambda x, w: F.dropout(x, 0.5, True), "dropout"),                  # random: never local
], ids=["sum-batch", "flip-batch", "transpose-batch", "index-batch", "matmul-broadcast", "sdpa-all-tokens",
        "dropout-on"])
def test_batch_mixing_ops_are_not_local_per_sequence(fn, name):
    assert not local_per_sequence(traced(fn, X, torch.randn(H)), name)


def test_a_wrong_rule_fails_the_check():
    """cumsum over the tokens claimed pointwise: the random-input check refuses it."""
    gm = traced(lambda x: x.cumsum(1), X)
    n = node(gm, "cumsum")
    wrong = tl.Rule("pointwise", {n.args[0]: tl.ArgUse(True, (H,))}, (H,))
    assert tl.rule(n, T) is None and not tl.verify(n, wrong, T)


def test_chunk_sizes():
    assert tl.chunk_sizes(10, 3) == [4, 3, 3] and tl.chunk_sizes(2, 4) == [1, 1, 0, 0]


LAYOUT = layouts.pack([(0, False, None), None, (1, False, None), None, None, None])[1]


def decoder_layer(h0, attn_w, norm_w, router_w, w_up, w_down, shared_w):
    """Attention (mixes tokens), residual, norm, router with an aux loss, EP experts beside a shared
    expert, residual, then a scan over the sequence (mixes tokens)."""
    a = torch.softmax(h0 @ h0.transpose(1, 2), dim=-1) @ h0
    h = h0 + F.linear(a, attn_w)
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w
    x = n.view(-1, H)
    logits = F.linear(x, router_w)
    aux = logits.softmax(-1).mean(0).pow(2).sum()
    w, ids = torch.ops.moec.route.default(logits, None, 2, "softmax", True, 1.0, 1, 1)
    offsets, src, inv = torch.ops.moec.plan.default(ids, E)
    y = ep_experts(x, src, offsets, 2, [w_up, w_down], LAYOUT, "silu", 0.0, 0.0, "0")
    out = torch.ops.moec.combine.default(y, inv, w).view(B, S, H)
    h2 = h + out + F.silu(F.linear(n, shared_w))
    return h2 * 2, h2.cumsum(1), aux


def test_neighbourhood_of_a_layer():
    p = lambda *s: torch.randn(*s) / s[-1] ** 0.5   # noqa: E731
    gm = traced(decoder_layer, X, p(H, H), p(H), p(E, H), p(E, F_, H), p(E, H, F_), p(H, H))
    [ep] = [n for n in gm.graph.nodes if n.target is ep_experts]
    layer = _find(gm, ep, 2, capacity=False)
    assert not isinstance(layer, str), layer
    ops = lambda nodes: [op_name(n) for n in nodes]   # noqa: E731
    # before: o_proj, residual, norm, view, router; not the attention
    assert ops(layer.pre) == ["linear", "add", "pow", "mean", "add", "rsqrt", "mul", "mul", "view", "linear"]
    # beside: the router probabilities of the aux loss (its mean over tokens is not) and the shared expert
    assert ops(layer.side) == ["softmax", "linear", "silu"]
    # after: both residual adds and the scaling; not the scan over the sequence
    assert ops(layer.post) == ["view", "add", "add", "mul"]
    stops = dict(layer.stops)
    assert "matmul_1" in stops and "cumsum" in stops, stops
    for n in (*layer.pre, *layer.side, *layer.post):
        assert tl.verify(n, layer.rules[n], T), n
    # cut in whole sequences: the attention before and the scan after are chunked too
    per_sequence = _find(gm, ep, 2, capacity=False, units=B)
    assert ops(per_sequence.pre) == ["transpose", "matmul", "softmax", "matmul"] + ops(layer.pre), \
        ops(per_sequence.pre)
    assert ops(per_sequence.post) == ["view", "add", "add", "mul", "cumsum"], ops(per_sequence.post)
    assert ops(per_sequence.side) == ops(layer.side) and per_sequence.U == B
    for n in (*per_sequence.pre, *per_sequence.side, *per_sequence.post):
        assert tl.verify(n, per_sequence.rules[n], B, k=B), n
