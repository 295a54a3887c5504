"""`torch.ops.moec.router_plan`: a router's linear layer then `moec.route_plan` as one op
(passes/fuse_router.py emits it where route_plan reads `linear(x, W, b)`), so that a decode step
computes its logits, routes and plans in one launch (router_plan_kernel.py) instead of a cuBLAS
GEMV then route_plan's launch. Larger batches, and the CPU, run the linear layer then route_plan
as before. The logits are an output too: a graph may read them elsewhere (an auxiliary loss, a
model's router_logits output). Gradients as the pair's: the routing weights' into the logits,
then into x, W and b as a linear layer's.

Off by default (ENABLED; MOEC_ROUTER_PLAN=1 turns it on): with the fresh counter it zeroes each call,
the pair was faster on an H100 (stop 37, benchmarks/route_plan_ab.py; router_plan_kernel.py says by how much).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels, route_plan_op
from .dispatch import moec_op
from .env import switch
from .ops import _check_float, _same_device
from .errors import MoecKernelError

ENABLED = switch("MOEC_ROUTER_PLAN", False)


def cache_key() -> str:
    """passes/fuse_router.py emits the op only with ENABLED: graphs compiled under one setting are
    not to be replayed under the other (moec/cache_tag.py)."""
    return f"router_plan={ENABLED}"


@moec_op("router_plan")
def router_plan(x: Tensor, w_router: Tensor, b_router: Optional[Tensor], bias: Optional[Tensor], k: int,
                scoring: str, renormalize: bool, scale: float, n_group: int, topk_group: int, num_experts: int,
                group_fill: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (T, H), w_router (E, H), b_router (E,) or None -> (logits (T, E) in x's dtype, then
    route_plan's weights, ids, offsets, src and inv for those logits)."""
    _check(x, w_router, b_router, bias, k, scoring, n_group, topk_group, num_experts, group_fill)
    if kernels.use_triton(x):
        from .router_plan_kernel import router_plan_launch, takes
        if takes(x.shape[0], k) and num_experts == w_router.shape[0]:
            from .route_plan_kernel import SORT
            return router_plan_launch(x, w_router, b_router, bias, k, scoring, renormalize, scale, n_group,
                                      topk_group, group_fill, sort=SORT)
    logits = F.linear(x, w_router, b_router)
    return (logits, *route_plan_op.run(logits, bias, k, scoring, renormalize, scale, n_group, topk_group,
                                       num_experts, group_fill))


@router_plan.register_fake
def _(x, w_router, b_router, bias, k, scoring, renormalize, scale, n_group, topk_group, num_experts,
      group_fill=None):
    _check(x, w_router, b_router, bias, k, scoring, n_group, topk_group, num_experts, group_fill)
    logits = x.new_empty(x.shape[0], w_router.shape[0])
    return (logits, *route_plan_op.fake(logits, bias, k, scoring, renormalize, scale, n_group, topk_group,
                                        num_experts, group_fill))


def _check(x, w_router, b_router, bias, k, scoring, n_group, topk_group, num_experts, group_fill):
    _check_float("router_plan", "x", x, dims=2)
    _check_float("router_plan", "w_router", w_router, dims=2)
    named = {"w_router": w_router} if b_router is None else {"w_router": w_router, "b_router": b_router}
    _same_device("router_plan", x, **named)
    E, H = w_router.shape
    if H != x.shape[1]:
        raise MoecKernelError(f"moec.router_plan: x has {x.shape[1]} features, w_router (E, H) has {H}")
    if b_router is not None and tuple(b_router.shape) != (E,):
        raise MoecKernelError(f"moec.router_plan: b_router has shape {tuple(b_router.shape)}, expected ({E},)")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise MoecKernelError(f"moec.router_plan: {name} is {t.dtype} but x is {x.dtype}; a linear layer "
                                  "needs one dtype")
    route_plan_op.check(x.new_empty(0, E), bias, k, scoring, n_group, topk_group, num_experts, group_fill)


def _setup(ctx, inputs, output):
    x, w_router, b_router, _bias, _k, scoring, renormalize, scale = inputs[:8]
    ctx.save_for_backward(x, w_router, output[0], output[2])
    ctx.args = (scoring, renormalize, scale)
    ctx.has_b = b_router is not None
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_logits, grad_weights, *_grad_rest):
    x, w_router, logits, ids = ctx.saved_tensors
    grad = torch.zeros_like(logits) if grad_weights is None else torch.ops.moec.route_backward(
        grad_weights.contiguous(), logits, ids, *ctx.args)
    if grad_logits is not None:
        grad = grad + grad_logits
    grad_x = grad @ w_router if ctx.needs_input_grad[0] else None
    grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
    grad_b = grad.sum(0) if ctx.has_b and ctx.needs_input_grad[2] else None
    return (grad_x, grad_w, grad_b) + (None,) * (ctx.n_inputs - 3)


router_plan.register_autograd(_backward, setup_context=_setup)
