"""experts_backward_rows + experts_wgrad (the backward split so that weight gradients can run under
an all-to-all) give what experts_backward gives: reference twins in float64, and the Triton path
bit for bit against its own fused backward, on NaN-padded strided bases (interleaved fused
gate_up, transposed), with dropped copies, empty experts and frozen bases."""
import pytest
import torch

from moec.codegen import reference, tuning
from moec.codegen.errors import MoecKernelError

from kernel_helpers import DEVICE, TOL, rel_err
from test_experts_launch import SMALL, _layer, _routing

ARGS = ("silu", 1.702, 7.0)
CASES = [dict(gated=True, bias=False, layout="interleaved", how="uniform"),
         dict(gated=True, bias=True, layout="transposed", how="sparse"),
         dict(gated=False, bias=True, layout="transposed", how="uniform"),
         dict(gated=True, bias=True, layout="interleaved", how="one_expert")]


def _inputs(T, E, k, H, F, dtype, gated, bias, layout, how):
    offsets, src, _ = _routing(T, E, k, how)
    weights, layout = _layer(E, H, F, dtype, gated, bias, layout)
    x = torch.randn(T, H, dtype=dtype, device=DEVICE)
    gy = torch.randn(src.shape[0], H, dtype=dtype, device=DEVICE)
    return gy, x, src, offsets, k, [w.detach() for w in weights], layout


def _split(op, gy, x, src, offsets, k, weights, layout, needs):
    dx, h, du, dg = op.experts_backward_rows(gy, x, src, offsets, k, weights, layout, *ARGS)
    return [dx] + list(op.experts_wgrad(gy, x, src, offsets, k, h, du, dg, weights, layout, needs))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("frozen", [False, True])
def test_reference_split_equals_fused(case, frozen):
    gy, x, src, offsets, k, weights, layout = _inputs(13, 4, 2, 24, 16, torch.float64, **case)
    gy, x, src, offsets = gy.cpu(), x.cpu(), src.cpu(), offsets.cpu()
    weights = [w.cpu() for w in weights]
    needs = [not (frozen and i == 0) for i in range(len(weights))]
    fused = reference.experts_backward(gy, x, src, offsets, k, weights, layout, *ARGS, needs)
    split = _split(reference, gy, x, src, offsets, k, weights, layout, needs)
    assert len(split) == len(fused)
    for got, want in zip(split, fused):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_split_equals_its_fused_backward(case, dtype):
    gy, x, src, offsets, k, weights, layout = _inputs(13, 4, 2, 40, 24, dtype, **case)
    needs = [True] * len(weights)
    pins = dict(gate_up_bwd=SMALL, down_dx=SMALL, wgrad=SMALL, wgrad_dual=SMALL)
    with tuning.pin(**pins):
        fused = torch.ops.moec.experts_backward(gy, x, src, offsets, k, weights, layout, *ARGS, needs)
        split = _split(torch.ops.moec, gy, x, src, offsets, k, weights, layout, needs)
    d = lambda t: t.detach().cpu().double()
    want = reference.experts_backward(d(gy), d(x), src.cpu(), offsets.cpu(), k, [d(w) for w in weights], layout,
                                      *ARGS)
    for got, same, ref in zip(split, fused, want):
        assert torch.equal(got, same)             # the same kernels on the same values
        assert ref.abs().max() == 0 or rel_err(got.cpu(), ref) < TOL[dtype]


def test_no_copies():
    gy, x, src, offsets, k, weights, layout = _inputs(0, 4, 2, 24, 16, torch.float32, **CASES[0])
    dx, h, du, dg = torch.ops.moec.experts_backward_rows(gy, x, src, offsets, k, weights, layout, *ARGS)
    assert dx.shape == x.shape and h.shape == du.shape == dg.shape == (0, 16)
    grads = torch.ops.moec.experts_wgrad(gy, x, src, offsets, k, h, du, dg, weights, layout, [True, True])
    assert [g.shape for g in grads] == [w.shape for w in weights] and all(g.abs().max() == 0 for g in grads)


def test_lora_layouts_are_refused():
    gy, x, src, offsets, k, weights, _ = _inputs(5, 4, 2, 24, 16, torch.float32, **CASES[0])
    layout = "w_up=0[16:32:1] w_gate=0[0:16:1] w_down=1 lora_a_up=0 lora_b_up=1 lora_scale_up=2.0"
    with pytest.raises(MoecKernelError, match="LoRA factors"):
        torch.ops.moec.experts_backward_rows(gy, x, src, offsets, k, weights, layout, *ARGS)
