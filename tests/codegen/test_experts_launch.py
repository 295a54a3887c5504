"""experts / experts_backward through the Triton path (gate_up, down, wgrad kernels and the
token-wise row sum) against float64 references, on NaN-padded strided base weights read through
layouts (interleaved fused gate_up, transposed), one gradient per base."""
import pytest
import torch

from moec.codegen import layout as layouts
from moec.codegen import reference, tuning
from moec.codegen.tuning import Tile

from kernel_helpers import DEVICE, TOL, assert_grads_close, padded, rel_err

SMALL = Tile(16, 16, 16, 4, 1)   # many partial tiles at tiny widths


def _layer(E, H, F, dtype, gated, bias, layout, pad=3):
    """(bases, layout) as the rewrite hands them over: fused / transposed parameters and their views
    (pad: the NaN margin of each base; 8 keeps rows 16-byte aligned, as TMA needs)."""
    if layout == "interleaved":          # fused gate_up (E, 2F, H), gate = rows 0::2, up = 1::2
        fused = padded((E, 2 * F, H), dtype, pad, scale=H ** -0.5)
        up, gate = (fused, False, (1, 2, None)), (fused, False, (0, 2, None))
    else:                                # stored (E, H, F) and transposed
        up = (padded((E, H, F), dtype, pad, scale=H ** -0.5), True, None)
        gate = (padded((E, H, F), dtype, pad, scale=H ** -0.5), True, None)
    down = (padded((E, F, H), dtype, pad, scale=F ** -0.5), True, None)          # read as (E, H, F)
    b = (lambda *s: (padded(s, dtype, pad, scale=0.5), False, None)) if bias else (lambda *s: None)
    return layouts.pack([up, gate if gated else None, down, b(E, F), b(E, F) if gated else None, b(E, H)])


def _routing(T, E, k, how):
    if how == "one_expert":
        ids = torch.full((T, k), E - 1)
    elif how == "sparse":                # most experts empty, one copy dropped
        ids = torch.randint(0, 2, (T, k))
        if T:
            ids[0, -1] = -1
    else:
        ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    return reference.plan(ids.to(DEVICE), E)


def _run(T, E, k, H, F, dtype, act, gated=True, bias=False, layout="interleaved", how="uniform",
         tile=SMALL, pad=3, tol=None):
    x = padded((T, H), dtype).requires_grad_()
    offsets, src, inv = _routing(T, E, k, how)
    weights, layout = _layer(E, H, F, dtype, gated, bias, layout, pad)
    for w in weights:
        w.requires_grad_()
    args = (act, 1.702, 7.0)
    pins = {} if tile is None else dict(gate_up=tile, gate_up_bwd=tile, down=tile, down_dx=tile, wgrad=tile,
                                        wgrad_dual=tile)
    with tuning.pin(**pins):
        y = torch.ops.moec.experts(x, src, offsets, k, weights, layout, *args)
        gy = torch.randn_like(y)
        leaves = [x] + weights
        grads = torch.autograd.grad(y, leaves, gy) if y.numel() else [torch.zeros_like(t) for t in leaves]
    d = lambda t: t.detach().cpu().double()
    ref_w = [d(w) for w in weights]
    y_ref = reference.experts(d(x), src.cpu(), offsets.cpu(), k, ref_w, layout, *args)
    g_ref = reference.experts_backward(d(gy), d(x), src.cpu(), offsets.cpu(), k, ref_w, layout, *args)
    tol = tol or TOL[dtype]
    assert y.shape == y_ref.shape and y.dtype == dtype
    if y.numel():
        assert rel_err(y.cpu(), y_ref) < tol
    assert_grads_close(grads, g_ref, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act,gated,bias", [("silu", True, False), ("gelu", True, True),
                                            ("gelu_tanh", True, False), ("relu", False, True),
                                            ("silu", False, False), ("swiglu_oai", True, True)])
def test_activations(act, gated, bias, dtype):
    _run(11, 4, 2, 40, 24, dtype, act, gated, bias)


@pytest.mark.parametrize("T,E,k,how", [(0, 4, 2, "uniform"), (1, 4, 1, "uniform"), (23, 3, 3, "uniform"),
                                       (17, 4, 2, "one_expert"), (21, 6, 2, "sparse"), (19, 5, 1, "uniform")])
def test_routings(T, E, k, how):
    _run(T, E, k, 24, 40, torch.float32, "silu", how=how)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_weights_and_wide_tiles(dtype):
    _run(13, 4, 2, 48, 40, dtype, "silu", bias=True, layout="transposed", tile=Tile(32, 32, 32, 4, 1))


def test_float16():
    _run(9, 4, 2, 32, 16, torch.float16, "gelu_tanh")


@pytest.mark.skipif(DEVICE != "cuda", reason="real widths are for the GPU run")
@pytest.mark.parametrize("E,k,H,F,T", [(64, 8, 2048, 1024, 512), (128, 8, 2048, 768, 300), (8, 2, 4096, 14336, 100)])
def test_real_shapes_default_tiles(E, k, H, F, T):
    _run(T, E, k, H, F, torch.bfloat16, "silu", tile=None)
