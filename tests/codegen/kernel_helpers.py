"""Helpers for the kernel tests (device choice, error measure, NaN-padded views)."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in kernel output (out-of-bounds read or unwritten element)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def padded(shape, dtype, pad=3, scale=1.0):
    """Random values in a NaN-filled larger buffer: returns the (non-contiguous) inner view."""
    big = torch.full([s + pad for s in shape], float("nan"), dtype=dtype, device=DEVICE)
    view = big[tuple(slice(0, s) for s in shape)]
    view.copy_((torch.randn(shape, device=DEVICE) * scale).to(dtype))
    return view


def assert_grads_close(grads, want, tol):
    """Each gradient has its reference's shape and is within tol of it; an all-zero reference
    (an expert that got no tokens) must be matched by exact zeros."""
    assert len(grads) == len(want)
    for g, w in zip(grads, want):
        assert g.shape == w.shape
        assert w.numel() == 0 or (w.abs().max() == 0 and g.abs().max() == 0) or rel_err(g.cpu(), w) < tol


def record_calls(monkeypatch, module, *names):
    """Wrap module.<name> for each name so that every call appends the name to the returned list
    (a test's proof that a path was taken), then runs the real function."""
    calls = []
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, n=name, f=real: calls.append(n) or f(*a))
    return calls
