"""The inference forward's GEMV path (decode_experts_kernel.py) against float64 references: every
activation, biases, both weight layouts on NaN-padded views, dropped copies, an expert with every
copy, experts with none; and that it is taken exactly where decode_fused says."""

import pytest
import torch

from moec.codegen import decode_fused, experts_combine_launch, reference
from moec.codegen import layout as layouts

from kernel_helpers import DEVICE, TOL, padded, record_calls, rel_err
from test_experts_launch import _layer, _routing


@pytest.fixture
def fused(monkeypatch):
    """The GEMV path up to FUSED_MAX_TOKENS on any layer, and the list of its launches."""
    monkeypatch.setitem(decode_fused._state, "max_tokens", decode_fused.FUSED_MAX_TOKENS)
    monkeypatch.setitem(decode_fused._state, "any_layer", True)
    return record_calls(monkeypatch, experts_combine_launch, "decode_experts_launch")


def _run(T, E, k, H, F, dtype, act="silu", gated=True, bias=False, layout="interleaved", how="uniform",
         grad=False):
    x = padded((T, H), dtype)
    offsets, src, inv = _routing(T, E, k, how)
    route_w = torch.rand(T, k, device=DEVICE)
    bases, layout = _layer(E, H, F, dtype, gated, bias, layout)
    args = (act, 1.702, 7.0)
    with torch.set_grad_enabled(grad):
        out, pre = torch.ops.moec.experts_combine(x, src, offsets, inv, route_w, k, bases, layout, *args, False)
    d = lambda t: t.detach().cpu().double()
    want, _ = reference.experts_combine(d(x), src.cpu(), offsets.cpu(), inv.cpu(), d(route_w), k,
                                        [d(w) for w in bases], layout, *args, False)
    assert out.shape == want.shape and out.dtype == dtype and pre.numel() == 0
    if out.numel():
        assert rel_err(out.cpu(), want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act,gated,bias", [("silu", True, False), ("gelu", True, True), ("relu", False, True),
                                            ("gelu_tanh", False, False), ("swiglu_oai", True, True)])
def test_activations(fused, act, gated, bias, dtype):
    _run(1, 6, 4, 40, 24, dtype, act, gated, bias)
    assert fused == ["decode_experts_launch"]


@pytest.mark.parametrize("T,E,k,how,layout", [(1, 8, 8, "uniform", "interleaved"),
                                              (3, 4, 2, "one_expert", "transposed"),
                                              (5, 6, 2, "sparse", "interleaved"),
                                              (16, 5, 1, "uniform", "transposed")])
def test_routings(fused, T, E, k, how, layout):
    """sparse: most experts empty and one copy dropped (past offsets[E]), which must count zero."""
    _run(T, E, k, 24, 40, torch.float32, bias=how == "sparse", how=how, layout=layout)
    assert fused == ["decode_experts_launch"]


def test_many_f_blocks(fused, monkeypatch):
    """More partial rows than the reduction reads at once (3 copies x 100 blocks of 16 columns, 256
    rows a load), F and H not multiples of their blocks."""
    monkeypatch.setitem(decode_fused._state, "settings", (16, 16, 1, 1))
    _run(2, 4, 3, 37, 1590, torch.float32, bias=True)
    assert fused == ["decode_experts_launch"]


def test_fewer_rows_than_the_tile(fused, monkeypatch):
    """A program streams rows_f < block_f rows of F (the policy's 48 in a 64-wide tile at one Qwen3
    token): the tile's rows past rows_f belong to the next program and must not count twice, and F
    is not a multiple of rows_f."""
    monkeypatch.setitem(decode_fused._state, "settings", (64, 48, 16, 1, 1))
    _run(2, 4, 2, 24, 100, torch.float32, bias=True)
    assert fused == ["decode_experts_launch"]


def test_taken_only_where_asked(fused, monkeypatch):
    """Above max_tokens, with LoRA, and when saving for backward the grouped kernels run."""
    monkeypatch.setitem(decode_fused._state, "max_tokens", 2)
    _run(3, 4, 2, 24, 16, torch.float32)
    _run(2, 4, 2, 24, 16, torch.float32)
    assert fused == ["decode_experts_launch"]
    roles = layouts.views(*_layer(4, 24, 16, torch.float32, True, False, "interleaved"))
    assert decode_fused.use(torch.empty(0), 2, False, roles)
    assert not decode_fused.use(torch.empty(0), 2, True, roles)
    assert not decode_fused.use(torch.empty(0), 0, False, roles)
    monkeypatch.setitem(decode_fused._state, "max_tokens", 0)
    _run(1, 4, 2, 24, 16, torch.float32)
    assert fused == ["decode_experts_launch"]


def test_default_layers(monkeypatch):
    """By default: small experts whose gate/up rows are contiguous along H (Qwen3's, OLMoE's), at
    one or two tokens; not large experts (DeepSeek-V3's, Mixtral's), not H-strided rows (GPT-OSS's
    interleaved gate/up, a transposed base), where the grouped GEMMs measured as fast or faster."""
    monkeypatch.setitem(decode_fused._state, "max_tokens", decode_fused.DEFAULT_MAX_TOKENS)
    monkeypatch.setitem(decode_fused._state, "any_layer", False)
    x = torch.empty(0)
    small = lambda layout: layouts.views(*_layer(4, 24, 16, torch.float32, True, False, layout))
    assert decode_fused.use(x, 1, False, small("interleaved")) and decode_fused.use(x, 2, False, small("interleaved"))
    assert not decode_fused.use(x, 3, False, small("interleaved"))
    assert not decode_fused.use(x, 1, False, small("transposed"))
    big = [torch.empty(8, 4096, 1024, dtype=torch.bfloat16).expand(8, 4096, 1024)] * 3   # 3 x 8 MB an expert
    assert not decode_fused.use(x, 1, False, big + [None] * 3)
    assert decode_fused.use(x, 1, False, [w[:, :2048] for w in big] + [None] * 3)


def test_training_forward_takes_grouped_kernels(fused):
    """save=True (a forward autograd will differentiate) never takes the GEMV path."""
    x = padded((1, 24), torch.float32)
    offsets, src, inv = _routing(1, 4, 2, "uniform")
    bases, layout = _layer(4, 24, 16, torch.float32, True, False, "interleaved")
    out, pre = torch.ops.moec.experts_combine(x, src, offsets, inv, torch.rand(1, 2, device=DEVICE), 2, bases,
                                              layout, "silu", 1.702, 7.0, True)
    assert fused == [] and pre.shape == (2, 32)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_alone_equals_it_in_a_batch(monkeypatch, dtype):
    """Batch invariance across the two paths: each token of a 5-token batch (grouped GEMMs) run alone
    (the GEMV path, as the default takes it) gives its row of the batch's output, to the dtype's
    tolerance: no token's result reads another's rows, whichever path runs."""
    monkeypatch.setitem(decode_fused._state, "max_tokens", decode_fused.DEFAULT_MAX_TOKENS)
    monkeypatch.setitem(decode_fused._state, "any_layer", False)
    calls = record_calls(monkeypatch, experts_combine_launch, "decode_experts_launch")
    T, E, k, H, F = 5, 6, 2, 40, 24
    x = padded((T, H), dtype)
    logits = torch.randn(T, E, device=DEVICE)
    bases, layout = _layer(E, H, F, dtype, True, True, "interleaved")
    args = ("silu", 1.702, 7.0, False)

    def layer(rows):
        w, ids = torch.ops.moec.route(logits[rows], None, k, "softmax", True, 1.0, 1, 1)
        offsets, src, inv = torch.ops.moec.plan(ids, E)
        return torch.ops.moec.experts_combine(x[rows], src, offsets, inv, w, k, bases, layout, *args)[0]
    batch = layer(slice(0, T))
    assert calls == []
    for t in range(T):
        assert rel_err(layer(slice(t, t + 1)).cpu(), batch[t:t + 1].cpu()) < TOL[dtype]
    assert calls == ["decode_experts_launch"] * T


def test_describe_says_which_path_and_why(monkeypatch):
    """The dumps' kernels.json line for a layer's inference forwards (moec/dump.py)."""
    monkeypatch.setitem(decode_fused._state, "max_tokens", decode_fused.DEFAULT_MAX_TOKENS)
    monkeypatch.setitem(decode_fused._state, "any_layer", False)
    qwen3, deepseek = 3 * 768 * 2048 * 2, 3 * 2048 * 7168 * 2
    assert decode_fused.describe(qwen3, True, False).startswith("one GEMV kernel + a per-token reduction at <= 2")
    assert "experts of 84.0 MiB > 16 MiB" in decode_fused.describe(deepseek, True, False)
    assert "strided along the hidden axis" in decode_fused.describe(qwen3, False, False)
    assert "LoRA" in decode_fused.describe(qwen3, True, True)
    monkeypatch.setitem(decode_fused._state, "max_tokens", 0)
    assert "MOEC_DECODE_FUSED=0" in decode_fused.describe(qwen3, True, False)
