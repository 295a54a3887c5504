"""dW_down through torch._grouped_mm (codegen/grouped_mm_wgrad.py) against float64: both
orientations of the down base, a trained b_down, experts with no rows, a dropped copy, every copy
on one expert; and where it must not be taken (moec's kernel then). On the CPU the path runs on
torch's fallback of `_grouped_mm` (ANY_DEVICE); on an sm90 card on CUTLASS's kernel."""
import pytest
import torch

from moec.codegen import grouped_mm_wgrad, kernels, reference, wgrad_kernel
from moec.codegen import layout as layouts

from kernel_helpers import DEVICE, rel_err
from test_experts_launch import _routing

OPS = torch.ops.moec
E, k, H, F = 4, 2, 24, 16


@pytest.fixture
def taken(monkeypatch):
    monkeypatch.setattr(grouped_mm_wgrad, "ANY_DEVICE", True)
    monkeypatch.setattr(grouped_mm_wgrad, "ENABLED", True)
    calls = []
    real = grouped_mm_wgrad.down_wgrad
    monkeypatch.setattr(grouped_mm_wgrad, "down_wgrad", lambda *a: calls.append(1) or real(*a))
    return calls


def _layer(transposed, bias, dtype=torch.bfloat16):
    w = lambda *s: (torch.randn(*s, device=DEVICE) * s[-1] ** -0.5).to(dtype)     # noqa: E731
    gate_up = (w(E, 2 * F, H), False, None)
    down = (w(E, F, H), True, None) if transposed else (w(E, H, F), False, None)
    up, gate = (gate_up[0], False, (F, 1, None)), (gate_up[0], False, (0, 1, F))
    return layouts.pack([up, gate, down, None, None, (w(E, H), False, None) if bias else None])


@pytest.mark.parametrize("transposed,bias", [(False, False), (True, True)])
@pytest.mark.parametrize("how", ["uniform", "sparse", "one_expert"])
def test_down_weight_gradient_through_grouped_mm(taken, transposed, bias, how):
    T = 9
    offsets, src, inv = _routing(T, E, k, how)
    bases, layout = _layer(transposed, bias)
    go = torch.randn(T, H, device=DEVICE).to(torch.bfloat16)
    hw = torch.randn(T * k, F, device=DEVICE).to(torch.bfloat16)
    route_w = torch.rand(T, k, device=DEVICE).to(torch.bfloat16)
    needs = [False, True] + [True] * bias
    with kernels.backend("triton"):
        got = OPS.experts_down_wgrad(go, hw, src, offsets, route_w, k, bases, layout, needs)
    assert taken, "the grouped_mm path was not taken"
    d = lambda t: t.cpu().double()      # noqa: E731
    want = reference.down_weight_grads(d(go), d(hw), src.cpu(), offsets.cpu(), k, d(route_w), [d(b) for b in bases],
                                       layout, needs)
    for i in (1, 2) if bias else (1,):
        assert got[i].shape == bases[i].shape and got[i].is_contiguous()
        assert rel_err(got[i].cpu(), want[i]) < 1e-2, i
    empty = (offsets[1:] == offsets[:-1]).cpu()
    assert torch.equal(got[1].cpu()[empty], torch.zeros_like(got[1].cpu()[empty]))    # no rows: zeros


def test_where_the_grouped_mm_path_is_not_taken(taken, monkeypatch):
    bases, layout = _layer(False, False)
    hw = torch.randn(6, F, device=DEVICE).to(torch.bfloat16)
    assert grouped_mm_wgrad.whole_base(hw, bases, layout, [True, True]) == (1, False)
    assert grouped_mm_wgrad.whole_base(hw.float(), bases, layout, [True, True]) is None          # bf16 only
    assert grouped_mm_wgrad.whole_base(hw, bases, layout, [True, False]) is None                 # down frozen
    sliced = layout.replace("w_down=1", "w_down=1[0:8:1]")
    assert grouped_mm_wgrad.whole_base(hw, bases, sliced, [True, True]) is None                  # part of a base
    shared = layouts.pack([(bases[0], False, (F, 1, None)), None, (bases[0], True, (0, 1, F))])[1]
    assert grouped_mm_wgrad.whole_base(hw, bases[:1], shared, [True]) is None                   # base read twice
    odd = [bases[0], bases[1].transpose(1, 2).contiguous().transpose(1, 2)]
    assert grouped_mm_wgrad.whole_base(hw, odd, layout, [True, True]) is None                    # not contiguous
    monkeypatch.setattr(wgrad_kernel, "MAX_COPY_BYTES", 1 << 20)
    assert grouped_mm_wgrad.whole_base(hw, bases, layout, [True, True]) is None                  # chunked copies
    monkeypatch.setattr(wgrad_kernel, "MAX_COPY_BYTES", wgrad_kernel._ONE_COPY_MIB << 20)
    monkeypatch.setattr(grouped_mm_wgrad, "ENABLED", False)
    assert grouped_mm_wgrad.whole_base(hw, bases, layout, [True, True]) is None                  # switched off
