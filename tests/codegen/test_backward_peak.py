"""The backward's peak memory: when the weight-gradient kernels run (each gathering its own (S, H)
copy of x or grad_out), the input-gradient rows (S, H) must already be freed; keeping them was
S x H on top of the peak (134 MB a layer at Qwen3 widths and 4096 tokens).
Counted on live tensor objects at each launch_wgrad call, the fused and the unfused backward."""
import gc

import pytest
import torch

from moec.codegen import experts_combine_launch, experts_launch, tuning, wgrad_kernel

from kernel_helpers import DEVICE, padded
from test_experts_launch import SMALL, _layer, _routing

T, E, k, H, F = 9, 3, 2, 40, 8


def _live(shape):
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == shape)


@pytest.fixture
def launches(monkeypatch):
    """(live (S, H) tensors at each launch_wgrad call) for the calls the test makes."""
    seen = []
    real = wgrad_kernel.launch_wgrad

    def counting(*args, **kwargs):
        seen.append(_live((T * k, H)))
        return real(*args, **kwargs)
    monkeypatch.setattr(experts_launch, "launch_wgrad", counting)
    monkeypatch.setattr(experts_combine_launch, "launch_wgrad", counting)
    return seen


@pytest.mark.parametrize("fused", [True, False])
def test_input_gradient_rows_are_freed_before_weight_gradients(launches, fused):
    x = padded((T, H), torch.float32).requires_grad_()
    offsets, src, inv = _routing(T, E, k, "uniform")
    bases, layout = _layer(E, H, F, torch.float32, True, False, "interleaved")
    for w in bases:
        w.requires_grad_()
    route_w = torch.rand(T, k, device=DEVICE, requires_grad=True)
    with tuning.pin(**{name: SMALL for name in ("gate_up", "gate_up_bwd", "down", "dh", "down_dx", "wgrad",
                                                 "wgrad_dual")}):
        if fused:
            out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, route_w, k, bases, layout, "silu", 0.0,
                                                    0.0, True)
        else:
            out = torch.ops.moec.experts(x, src, offsets, k, bases, layout, "silu", 0.0, 0.0)
        torch.autograd.grad(out, [x] + bases, torch.randn_like(out))
    assert len(launches) == 2       # dW_up + dW_gate in one launch, dW_down in another
    # unfused, the op's output y and its gradient are (S, H) and the test's: they stay; nothing else may
    assert max(launches) == (0 if fused else 2), launches
