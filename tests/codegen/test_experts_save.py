"""experts_save (the expert-parallel local experts' training op): y and the pre-activations it
keeps, and the backward that reads them (dh_kernel's grouped mode) instead of recomputing them,
fused and split (experts_backward_rows + experts_wgrad), against float64 references."""
import pytest
import torch

from moec.codegen import reference, tuning

from kernel_helpers import DEVICE, TOL, assert_grads_close, padded, rel_err
from test_experts_launch import SMALL, _layer, _routing

ARGS = ("gelu", 1.702, 7.0)
KERNELS = ("gate_up", "down", "dh", "gate_up_bwd", "down_dx", "wgrad", "wgrad_dual")


def _setup(T, E, k, H, F, dtype, gated, bias, layout, how):
    x = padded((T, H), dtype).requires_grad_()
    offsets, src, _ = _routing(T, E, k, how)
    weights, layout = _layer(E, H, F, dtype, gated, bias, layout)
    for w in weights:
        w.requires_grad_()
    return x, src, offsets, weights, layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,bias,layout,how", [(True, False, "interleaved", "uniform"),
                                                   (True, True, "transposed", "sparse"),
                                                   (False, True, "transposed", "one_expert")])
def test_save_and_backward_from_preactivations(gated, bias, layout, how, dtype):
    T, E, k, H, F = 13, 4, 2, 40, 24
    x, src, offsets, weights, layout = _setup(T, E, k, H, F, dtype, gated, bias, layout, how)
    with tuning.pin(**{name: SMALL for name in KERNELS}):
        y, pre = torch.ops.moec.experts_save(x, src, offsets, k, weights, layout, *ARGS)
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x] + weights, gy)
    d = lambda t: t.detach().cpu().double()
    ref_pre = torch.zeros(pre.shape, dtype=torch.float64)
    y_ref = reference.experts(d(x), src.cpu(), offsets.cpu(), k, [d(w) for w in weights], layout, *ARGS, ref_pre)
    g_ref = reference.experts_backward(d(gy), d(x), src.cpu(), offsets.cpu(), k, [d(w) for w in weights], layout,
                                       *ARGS)
    kept = int(offsets[-1])
    assert rel_err(y.cpu(), y_ref) < TOL[dtype] and rel_err(pre[:kept].cpu(), ref_pre[:kept]) < TOL[dtype]
    assert_grads_close(grads, g_ref, TOL[dtype])


def test_split_backward_reads_preactivations():
    """experts_backward_rows given pre gives the h, du, dg it gives when it recomputes them."""
    x, src, offsets, weights, layout = _setup(11, 4, 2, 24, 16, torch.float32, True, True, "interleaved",
                                              "sparse")
    x, weights = x.detach(), [w.detach() for w in weights]
    gy = torch.randn(src.shape[0], x.shape[1], device=DEVICE)
    with tuning.pin(**{name: SMALL for name in KERNELS}):
        _, pre = torch.ops.moec.experts_save(x, src, offsets, 2, weights, layout, *ARGS)
        recomputed = torch.ops.moec.experts_backward_rows(gy, x, src, offsets, 2, weights, layout, *ARGS)
        read = torch.ops.moec.experts_backward_rows(gy, x, src, offsets, 2, weights, layout, *ARGS, pre)
    kept = int(offsets[-1])
    assert rel_err(read[0].cpu(), recomputed[0].cpu()) < 1e-5
    for a, b in zip(read[1:], recomputed[1:]):
        assert rel_err(a[:kept].cpu(), b[:kept].cpu()) < 1e-5
