"""moec.experts on fused base weights (codegen/layout.py): the gradient of each fused parameter,
taken below autograd in one buffer, equals autograd through explicit views of it (float64), on
the Triton kernels and on the reference; and the layout string round-trips."""
import pytest
import torch

from moec.codegen import kernels, reference
from moec.codegen import layout as layouts

from kernel_helpers import DEVICE, rel_err

E, k, H, F, T = 4, 2, 24, 16, 13
ALPHA, LIMIT = 1.702, 7.0


def _fused(form, bias):
    """(role specs, bases): HF concat (E, 2F, H), interleaved rows, or GPT-OSS (E, H, 2F) transposed."""
    r = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE) * s[-1] ** -0.5
    if form == "gpt_oss":
        gu, down = r(E, H, 2 * F), r(E, F, H)            # y = h @ down[e]: read down transposed
        t, up, gate = True, (1, 2, None), (0, 2, None)
    else:
        gu, down = r(E, 2 * F, H), r(E, H, F)
        t = False
        up, gate = ((F, 1, 2 * F), (0, 1, F)) if form == "concat" else ((1, 2, None), (0, 2, None))
    b_gu, b_down = (r(E, 2 * F), r(E, H)) if bias else (None, None)
    specs = [(gu, t, up), (gu, t, gate), (down, form == "gpt_oss", None),
             None if b_gu is None else (b_gu, False, up), None if b_gu is None else (b_gu, False, gate),
             None if b_down is None else (b_down, False, None)]
    return specs


def _routing():
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEVICE)
    ids[0, 0] = -1                                        # a dropped copy
    return reference.plan(ids, E)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("form", ["concat", "interleaved", "gpt_oss"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_grads_equal_autograd_through_views(form, bias, backend):
    act = "swiglu_oai" if form == "gpt_oss" else "silu"
    offsets, src, _ = _routing()
    bases, layout = layouts.pack(_fused(form, bias))
    assert len(bases) == (4 if bias else 2)
    x = torch.randn(T, H, dtype=torch.float64, device=DEVICE)
    gy = torch.randn(T * k, H, dtype=torch.float64, device=DEVICE)

    # the twin: views taken above autograd, gradients through slice/transpose backward, float64
    ref_bases = [b.clone().requires_grad_() for b in bases]
    ref_x = x.clone().requires_grad_()
    roles = layouts.views(ref_bases, layout)
    present = [t for t in roles if t is not None]
    per_role = layouts.format_layout({r: layouts.View(i) for i, r in
                                      enumerate(r for r, t in zip(layouts.ROLES, roles) if t is not None)})
    y_ref = reference.experts(ref_x, src, offsets, k, present, per_role, act, ALPHA, LIMIT)
    want = torch.autograd.grad(y_ref, [ref_x] + ref_bases, gy)

    # the op on the bases, in float32 for the kernels (they have no float64), float64 otherwise
    dtype = torch.float32 if backend == "triton" else torch.float64
    op_bases = [b.to(dtype).requires_grad_() for b in bases]
    op_x = x.to(dtype).requires_grad_()
    with kernels.backend(backend):
        y = torch.ops.moec.experts(op_x, src, offsets, k, op_bases, layout, act, ALPHA, LIMIT)
        got = torch.autograd.grad(y, [op_x] + op_bases, gy.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert rel_err(y, y_ref.detach()) < tol
    for name, g, w, b in zip(["x"] + [f"weights[{i}]" for i in range(len(bases))], got, want, [x] + bases):
        assert g.shape == b.shape and g.stride() == b.stride(), name
        assert rel_err(g, w) < tol, name


def test_uncovered_and_overlapping_roles_still_sum_like_autograd():
    """Layouts moec's rewrite never emits (half a base unread; up and gate the same rows) fall
    back to zero-fill and accumulate, and stay right."""
    offsets, src, _ = _routing()
    w = torch.randn(E, 3 * F, H, dtype=torch.float32, device=DEVICE)
    down = torch.randn(E, H, F, dtype=torch.float32, device=DEVICE)
    layout = "w_up=0[0:16:1] w_gate=0[0:16:1] w_down=1"
    assert layouts.grad_plan(layout, ((3 * F, H), (H, F))) == ((0,), ("w_gate",))
    x = torch.randn(T, H, device=DEVICE)
    gy = torch.randn(T * k, H, device=DEVICE)
    ws = [w.clone().requires_grad_(), down.clone().requires_grad_()]
    with kernels.backend("triton"):
        got = torch.autograd.grad(torch.ops.moec.experts(x, src, offsets, k, ws, layout, "silu", 0.0, 0.0), ws, gy)
    want = reference.experts_backward(gy.double(), x.double(), src, offsets, k, [w.double(), down.double()],
                                      layout, "silu", 0.0, 0.0)[1:]
    assert got[0][:, F:].abs().max() == 0
    for g, v in zip(got, want):
        assert rel_err(g, v) < 1e-5


def test_layout_round_trip_and_errors():
    specs = [("gu", True, (1, 2, None)), ("gu", True, (0, 2, None)), ("d", True, None), None, None, ("bd", False, None)]
    bases, text = layouts.pack(specs)
    assert bases == ["gu", "d", "bd"] and text == "w_up=0T[1::2] w_gate=0T[0::2] w_down=1T b_down=2"
    assert layouts.format_layout(layouts.parse(text)) == text
    with pytest.raises(ValueError, match="w_upp=0"):
        layouts.parse("w_upp=0")
    x = torch.randn(3, H)
    with pytest.raises(Exception, match="must use each of the 3 weights"):
        torch.ops.moec.experts(x, torch.zeros(6, dtype=torch.long), torch.zeros(E + 1, dtype=torch.long), 2,
                               [torch.randn(E, F, H), torch.randn(E, H, F), torch.randn(E, H)], "w_up=0 w_down=1",
                               "silu", 0.0, 0.0)
