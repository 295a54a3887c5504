"""moec.experts with LoRA factors (codegen/layout.py's lora_* roles) against autograd through the
merged weights W + s * L @ R, in float64: outputs, and the gradients of x, of the factors and of
the base weights when they train; frozen bases get no gradient. Layouts as the rewrite emits them
for PEFT's target_parameters: a fused gate_up whose A is shared by gate and up and whose B is
sliced (HF concat, interleaved, GPT-OSS transposed)."""
import pytest
import torch

from moec.codegen import kernels, reference
from moec.codegen import layout as layouts

from kernel_helpers import DEVICE, rel_err

E, k, H, F, T, R = 4, 2, 24, 16, 13, 3


def _r(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale


def _layer(form, lora_on, frozen=False, scale_up=2.0, scale_down=0.5):
    """(merged-weight specs, LoRA specs, leaves): P = W + s * L @ R per fused base, read either as
    P (the reference) or as W with the factors (what the rewrite emits)."""
    if form == "gpt_oss":            # stored (E, H, 2F) and (E, F, H): read transposed
        gu, down, t = (_r(E, H, 2 * F, scale=H ** -0.5), _r(E, F, H, scale=F ** -0.5)), None, True
        up, gate = (1, 2, None), (0, 2, None)
    else:
        gu, down, t = (_r(E, 2 * F, H, scale=H ** -0.5), _r(E, H, F, scale=F ** -0.5)), None, False
        up, gate = ((F, 1, 2 * F), (0, 1, F)) if form == "concat" else ((1, 2, None), (0, 2, None))
    w_gu, w_down = (w.requires_grad_(not frozen) for w in gu)
    factors = {}
    for name, w, s in (("gu", w_gu, scale_up), ("down", w_down, scale_down)):
        if name in lora_on:
            factors[name] = (_r(E, w.shape[1], R, scale=0.3).requires_grad_(),
                             _r(E, R, w.shape[2], scale=w.shape[2] ** -0.5).requires_grad_(), s)
    merged = {name: (w if name not in factors else
                     torch.baddbmm(w, factors[name][0], factors[name][1], alpha=factors[name][2]))
              for name, w in (("gu", w_gu), ("down", w_down))}
    plain = [(merged["gu"], t, up), (merged["gu"], t, gate), (merged["down"], t, None), None, None, None]
    bases = [(w_gu, t, up), (w_gu, t, gate), (w_down, t, None), None, None, None]
    lora = [None, None, None]
    for i, (name, sl) in enumerate((("gu", up), ("gu", gate), ("down", None))):
        if name in factors:
            lhs, rhs, s = factors[name]
            lora[i] = ((lhs, True, None), (rhs, True, sl), s) if t else ((rhs, False, None), (lhs, False, sl), s)
    leaves = [w_gu, w_down] + [f for name in ("gu", "down") if name in factors for f in factors[name][:2]]
    return plain, (bases, lora), leaves


def _routing():
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEVICE)
    ids[0, 0] = -1                                        # a dropped copy
    return reference.plan(ids, E)


@pytest.mark.parametrize("backend", ["reference"])
@pytest.mark.parametrize("form", ["concat", "interleaved", "gpt_oss"])
@pytest.mark.parametrize("lora_on", [("gu", "down"), ("gu",), ("down",)])
@pytest.mark.parametrize("frozen", [True, False])
def test_lora_equals_merged_weights(form, lora_on, frozen, backend):
    act = "swiglu_oai" if form == "gpt_oss" else "silu"
    args = (act, 1.702, 7.0)
    offsets, src, _ = _routing()
    plain, (bases, lora), leaves = _layer(form, lora_on, frozen)
    x = _r(T, H).requires_grad_()
    gy = _r(T * k, H)

    ref_bases, ref_layout = layouts.pack(plain)
    y_ref = torch.ops.moec.experts(x, src, offsets, k, ref_bases, ref_layout, *args)
    wanted = [x] + [t for t in leaves if t.requires_grad]
    g_ref = torch.autograd.grad(y_ref, wanted, gy)

    weights, layout = layouts.pack(bases, lora)
    assert "lora_a_" in layout
    with kernels.backend(backend):
        y = torch.ops.moec.experts(x, src, offsets, k, weights, layout, *args)
        g = torch.autograd.grad(y, wanted, gy)
    assert rel_err(y, y_ref) < 1e-12
    for got, want in zip(g, g_ref):
        assert got.shape == want.shape and rel_err(got, want) < 1e-12


def test_frozen_bases_get_no_gradient_work():
    """experts_backward with needs False for a base returns None for it and computes no role of it."""
    offsets, src, _ = _routing()
    _, (bases, lora), _ = _layer("concat", ("gu", "down"))
    weights, layout = layouts.pack(bases, lora)
    weights = [w.detach() for w in weights]
    x, gy = _r(T, H), _r(T * k, H)
    needs = [False, False] + [True] * (len(weights) - 2)
    got = reference.experts_backward(gy, x, src, offsets, k, weights, layout, "silu", 0.0, 0.0, needs)
    full = reference.experts_backward(gy, x, src, offsets, k, weights, layout, "silu", 0.0, 0.0)
    assert got[1] is None and got[2] is None
    for a, b in zip(got[3:] + got[:1], full[3:] + full[:1]):
        assert torch.equal(a, b)


def test_layout_round_trip_and_errors():
    _, (bases, lora), _ = _layer("interleaved", ("gu", "down"))
    weights, layout = layouts.pack(bases, lora)
    weights = [w.detach() for w in weights]
    parsed = layouts.parse(layout)
    assert layouts.format_layout(parsed, layouts.lora_scales(layout)) == layout
    assert parsed["lora_a_up"] == parsed["lora_a_gate"]          # PEFT's shared A
    assert layouts.lora_scales(layout) == {"up": 2.0, "gate": 2.0, "down": 0.5}
    with pytest.raises(ValueError, match="lora_a_up, lora_b_up and lora_scale_up together"):
        layouts.parse("w_up=0 w_down=1 lora_a_up=2")
    with pytest.raises(Exception, match="LoRA factors of up must be"):
        x = _r(T, H)
        offsets, src, _ = _routing()
        bad = [weights[0], weights[1], weights[2].transpose(1, 2), weights[3], *weights[4:]]
        torch.ops.moec.experts(x, src, offsets, k, bad, layout, "silu", 0.0, 0.0)
