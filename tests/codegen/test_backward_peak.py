"""The backward's peak memory: when the weight-gradient kernels run (each gathering its own (S, H)
copy of x or grad_out), the input-gradient rows (S, H) must already be freed; keeping them was
S x H on top of the peak (134 MB a layer at Qwen3 widths and 4096 tokens). Nor may a zero gradient
for the saved pre-activations (S, 2F) sit beside them (autograd materialises one unless told not to).
Nor may du and dg (S, F) outlive the gate/up weight gradients that read them last.
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


def _buffers_like(base):
    """Live storages the size of `base` held by tensors outside autograd: its gradient buffer (the
    per-role views of one buffer count once)."""
    return len({o.untyped_storage().data_ptr() for o in gc.get_objects() if isinstance(o, torch.Tensor)
                and not o.requires_grad and o.untyped_storage().nbytes() == base.numel() * base.element_size()})


class _Launches(list):
    """(live (S, H), (S, 2F), (S, F) tensors, live gradient buffers of each base in `bases`) at
    each launch_wgrad call the test makes."""
    bases = ()


@pytest.fixture
def launches(monkeypatch):
    seen = _Launches()
    real = wgrad_kernel.launch_wgrad

    def counting(*args, **kwargs):
        gc.collect()        # a cycle the previous test left is not alive
        seen.append((_live((T * k, H)), _live((T * k, 2 * F)), _live((T * k, F)),
                     tuple(_buffers_like(b) for b in seen.bases)))
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
    launches.bases = bases
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
    assert max(rows for rows, *_ in launches) == (0 if fused else 2), launches
    # fused: the saved pre-activations alone, no zero gradient materialised for them beside it
    assert max(pre for _, pre, *_ in launches) == (1 if fused else 0), launches
    if fused:
        # dW_up | dW_gate first, with w h, du, dg alive and their own buffer alone; then du and dg
        # are freed and the down buffer made before dW_down
        assert [b.numel() for b in bases] == [E * 2 * F * H, E * H * F]      # gate_up, then down
        assert [(f, g) for *_, f, g in launches] == [(3, (1, 0)), (1, (1, 1))], launches
