"""`torch.ops.moec.router`: a router's `F.linear(x, weight, bias)` (passes/fuse_router.py emits it
where the linear's logits feed moec's routing), so that a decode step's router GEMV runs as
router_kernel.py on the GPU, launched with PDL into the routing after it. Larger batches, weights
over MAX_WEIGHT_BYTES and layouts the kernel does not read take torch's linear: the same values
(logits in x's dtype) and the same gradients, which are torch's own matmuls.
"""
from typing import Optional

import torch
from torch import Tensor

from . import kernels
from .dispatch import moec_op
from .ops import _check_float, _same_device
from .errors import MoecKernelError

# weights up to this size stream through router_kernel.py at decode sizes (Qwen3's 0.5 MB, OLMoE's,
# GPT-OSS's, Mixtral's); DeepSeek-V3's float32 router (7 MB) takes cuBLAS's GEMM
MAX_WEIGHT_BYTES = 1 << 20
_state = {"on": True, "settings": (16, 256, 4, 4)}


def set_enabled(on: bool) -> None:
    """False: every router call takes torch's linear (benchmarks compare the two)."""
    _state["on"] = bool(on)


def set_settings(value) -> None:
    """(block_e, block_h, num_warps, num_stages) for router_kernel.py."""
    _state["settings"] = value


@moec_op("router")
def router(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (T, H), weight (E, H), bias (E,) or None -> logits (T, E) in x's dtype."""
    _check(x, weight, bias)
    if _kernel_reads(x, weight, bias):
        from .pdl import use as use_pdl
        from .router_kernel import router_launch
        out = x.new_empty(x.shape[0], weight.shape[0])
        return router_launch(x, weight, bias, out, _state["settings"], use_pdl(x, x.shape[0]))
    return torch.nn.functional.linear(x, weight, bias)


@router.register_fake
def _(x, weight, bias):
    _check(x, weight, bias)
    return x.new_empty(x.shape[0], weight.shape[0])


def _kernel_reads(x, weight, bias) -> bool:
    from .router_kernel import MAX_TOKENS
    return (_state["on"] and kernels.use_triton(x) and 0 < x.shape[0] <= MAX_TOKENS
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and x.stride(1) == 1 and weight.stride(1) == 1
            and (bias is None or bias.stride(0) == 1)
            and weight.numel() * weight.element_size() <= MAX_WEIGHT_BYTES)


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx = grad @ weight if ctx.needs_input_grad[0] else None
    dw = grad.t() @ x if ctx.needs_input_grad[1] else None
    db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


router.register_autograd(_backward, setup_context=_setup)


def _check(x, weight, bias):
    _check_float("router", "x", x, dims=2)
    _check_float("router", "weight", weight, dims=2)
    _same_device("router", x, weight=weight, **({} if bias is None else {"bias": bias}))
    if weight.shape[1] != x.shape[1] or (bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        raise MoecKernelError(f"moec.router: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                              f"{None if bias is None else tuple(bias.shape)} disagree: need x (T, H), weight (E, H), "
                              "bias (E,)")
