"""`moec.router` (the router's linear; router_kernel.py at decode sizes) against float64, values and
gradients, with and without a bias, on strided inputs; torch's linear past the kernel's limits."""
import pytest
import torch

from moec.codegen import router_kernel, router_op
from moec.codegen.errors import MoecKernelError

from kernel_helpers import DEVICE, TOL, padded, record_calls, rel_err


def _run(T, E, H, dtype, bias):
    x = padded((T, H), dtype).requires_grad_()
    w = padded((E, H), dtype, scale=H ** -0.5).requires_grad_()
    b = padded((E,), dtype).requires_grad_() if bias else None
    out = torch.ops.moec.router(x, w, b)
    g = torch.randn_like(out)
    leaves = [x, w] + ([b] if bias else [])
    grads = torch.autograd.grad(out, leaves, g)
    d = lambda t: t.detach().double()
    want = torch.nn.functional.linear(d(x), d(w), None if b is None else d(b))
    assert out.shape == (T, E) and out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype]
    dx, dw = d(g) @ d(w), d(g).t() @ d(x)
    for got, ref in zip(grads, [dx, dw] + ([d(g).sum(0)] if bias else [])):
        assert rel_err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,H,bias", [(1, 24, 40, False), (3, 8, 300, True), (16, 37, 64, True)])
def test_kernel(monkeypatch, T, E, H, bias, dtype):
    monkeypatch.setitem(router_op._state, "settings", (16, 32, 1, 1))
    calls = record_calls(monkeypatch, router_kernel, "router_launch")
    _run(T, E, H, dtype, bias)
    assert calls == ["router_launch"]


def test_linear_past_the_kernel(monkeypatch):
    """17 tokens, a weight over MAX_WEIGHT_BYTES: torch's linear, the same values."""
    calls = record_calls(monkeypatch, router_kernel, "router_launch")
    _run(17, 8, 24, torch.float32, True)
    monkeypatch.setattr(router_op, "MAX_WEIGHT_BYTES", 8 * 24 * 4 - 1)
    _run(2, 8, 24, torch.float32, False)
    assert calls == []


def test_bad_input():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(MoecKernelError, match="disagree"):
        torch.ops.moec.router(x, torch.randn(4, 9, device=DEVICE), None)
    with pytest.raises(MoecKernelError, match="2-D"):
        torch.ops.moec.router(x[None], torch.randn(4, 8, device=DEVICE), None)
    with pytest.raises(MoecKernelError, match="dtype"):
        torch.ops.moec.router(x.int(), torch.randn(4, 8, device=DEVICE), None)
