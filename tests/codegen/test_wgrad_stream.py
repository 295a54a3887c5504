"""The weight gradients on a second CUDA stream (codegen/streams.py) give what one stream gives,
bit for bit (the same kernels on the same inputs), for a layer with biases and one without,
across repeated steps (a reused buffer read before the other stream finished would differ)."""
import pytest
import torch

from moec.codegen import streams

from kernel_helpers import DEVICE, padded
from test_experts_launch import _layer, _routing

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="a second stream needs CUDA; on the CPU `beside` "
                                                         "runs the block in place (nothing to compare)")


def _grads(on, x, bases, layout, routing, route_w, grad, k):
    streams.set_wgrad_stream(on)
    try:
        offsets, src, inv = routing
        out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, route_w, k, bases, layout, "silu", 0.0, 0.0,
                                                True)
        return torch.autograd.grad(out, [x, route_w] + bases, grad)
    finally:
        streams.set_wgrad_stream(False)


@pytest.mark.parametrize("bias", [False, True])
def test_side_stream_gradients_equal_one_stream(bias):
    T, E, k, H, F = 300, 8, 2, 256, 128
    x = padded((T, H), torch.bfloat16).requires_grad_()
    bases, layout = _layer(E, H, F, torch.bfloat16, True, bias, "interleaved", pad=8)
    for w in bases:
        w.requires_grad_()
    route_w = torch.rand(T, k, device=DEVICE, requires_grad=True)
    routing = _routing(T, E, k, "uniform")
    for _ in range(3):
        grad = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
        want = _grads(False, x, bases, layout, routing, route_w, grad, k)
        got = _grads(True, x, bases, layout, routing, route_w, grad, k)
        torch.cuda.synchronize()
        for g, w in zip(got, want):
            assert torch.equal(g, w)
