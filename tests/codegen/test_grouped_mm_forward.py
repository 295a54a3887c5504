"""The forward's down projection through torch._grouped_mm (codegen/grouped_mm_forward.py) against
float64: both orientations of the down base, experts with no rows, a dropped copy (its row of y
zero), every copy on one expert; values and, through the training op, every gradient; and where it
must not be taken. On the CPU the path runs on torch's fallback of `_grouped_mm` (ANY_DEVICE); on an
sm90 card on CUTLASS's kernel."""
import pytest
import torch

from moec.codegen import grouped_mm_forward, grouped_mm_wgrad, kernels, reference
from moec.codegen import layout as layouts

from kernel_helpers import DEVICE, rel_err
from test_experts_launch import _routing
from test_grouped_mm_wgrad import _layer

OPS = torch.ops.moec
E, k, H, F = 4, 2, 24, 16
ARGS = ("silu", 1.702, 7.0)


@pytest.fixture
def taken(monkeypatch):
    monkeypatch.setattr(grouped_mm_wgrad, "ANY_DEVICE", True)
    monkeypatch.setattr(grouped_mm_forward, "ENABLED", True)
    calls = []
    real = grouped_mm_forward.down_rows
    monkeypatch.setattr(grouped_mm_forward, "down_rows", lambda *a: calls.append(1) or real(*a))
    return calls


def _d(t):
    return t.detach().cpu().double()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("how", ["uniform", "sparse", "one_expert"])
def test_experts_forward_down_through_grouped_mm(taken, transposed, how):
    T = 9
    offsets, src, inv = _routing(T, E, k, how)
    bases, layout = _layer(transposed, False)
    x = torch.randn(T, H, device=DEVICE).to(torch.bfloat16)
    with kernels.backend("triton"):
        y = OPS.experts(x, src, offsets, k, bases, layout, *ARGS)
    assert taken, "the grouped_mm path was not taken"
    want = reference.experts(_d(x), src.cpu(), offsets.cpu(), k, [_d(b) for b in bases], layout, *ARGS)
    end = int(offsets[-1])
    assert rel_err(y.cpu()[:end], want[:end]) < 2e-2
    assert torch.equal(y.cpu()[end:], torch.zeros_like(y.cpu()[end:]))      # dropped copies' rows: zeros


@pytest.mark.parametrize("how", ["uniform", "sparse"])
def test_training_op_with_the_grouped_mm_down(taken, how):
    """experts_combine forward (saving the pre-activations) and its backward, against float64."""
    T = 9
    offsets, src, inv = _routing(T, E, k, how)
    bases, layout = _layer(False, False)
    x = torch.randn(T, H, device=DEVICE).to(torch.bfloat16).requires_grad_()
    route_w = torch.rand(T, k, device=DEVICE).requires_grad_()
    for b in bases:
        b.requires_grad_()
    with kernels.backend("triton"):
        out, _ = OPS.experts_combine(x, src, offsets, inv, route_w, k, bases, layout, *ARGS, True)
        gout = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, route_w] + bases, gout)
    assert taken
    routing = (src.cpu(), offsets.cpu(), inv.cpu(), _d(route_w), k)
    want_out = reference.experts_combine(_d(x), *routing, [_d(b) for b in bases], layout, *ARGS, False)[0]
    assert rel_err(out.cpu(), want_out) < 2e-2
    want = reference.experts_combine_backward(_d(gout), _d(x), *routing, [_d(b) for b in bases], layout, *ARGS)
    for i, (g, w) in enumerate(zip(grads, want)):
        assert rel_err(g.cpu(), w) < 2e-2, i


def test_where_the_grouped_mm_down_is_not_taken(taken, monkeypatch):
    bases, layout = _layer(False, True)
    w_down, b_down = layouts.views(bases, layout)[2], layouts.views(bases, layout)[5]
    h = torch.randn(6, F, device=DEVICE).to(torch.bfloat16)
    assert grouped_mm_forward.down_taken(h, w_down, None, None, False)
    assert not grouped_mm_forward.down_taken(h.float(), w_down, None, None, False)          # bf16 only
    assert not grouped_mm_forward.down_taken(h, w_down, b_down, None, False)                # a down bias
    assert not grouped_mm_forward.down_taken(h, w_down, None, (h, h), False)                # LoRA
    assert not grouped_mm_forward.down_taken(h, w_down, None, None, True)                   # PDL chain
    assert not grouped_mm_forward.down_taken(h, w_down[:, :, :F - 3], None, None, False)    # unaligned rows
    monkeypatch.setattr(grouped_mm_forward, "ENABLED", False)
    assert not grouped_mm_forward.down_taken(h, w_down, None, None, False)                  # switched off
