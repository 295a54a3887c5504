"""`torch.ops.moec.route_plan`: `plan(route(logits)[1])` as one op (passes/fuse_routing.py emits it
where the plan reads the router's ids directly), so that a decode step routes and plans in one
launch (route_plan_kernel.py) and pays one op dispatch instead of two. Same outputs, same
gradient (the routing weights' into the logits) as the pair.
"""
from typing import Optional

import torch
from torch import Tensor

from . import kernels, reference
from .dispatch import moec_op
from .ops import _check_plan, _check_route, route_bwd, route_setup


@moec_op("route_plan")
def route_plan(logits: Tensor, bias: Optional[Tensor], k: int, scoring: str, renormalize: bool, scale: float,
               n_group: int, topk_group: int, num_experts: int, group_fill: Optional[float] = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """logits (T, E) -> (weights (T, k), ids (T, k), offsets (E+1,), src (T*k,), inv (T*k,)), as
    `moec.route` then `moec.plan` give them."""
    check(logits, bias, k, scoring, n_group, topk_group, num_experts, group_fill)
    return run(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, num_experts, group_fill)


def run(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, num_experts, group_fill=None):
    """route_plan's body, checks done (moec.router_plan runs it on the logits it computed)."""
    if kernels.use_triton(logits):
        from .route_plan_kernel import route_plan_launch
        return route_plan_launch(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, num_experts,
                                 group_fill)
    w, ids = reference.route(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, group_fill)
    return (w.contiguous(), ids.contiguous(), *reference.plan(ids, num_experts))


@route_plan.register_fake
def fake(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, num_experts, group_fill=None):
    check(logits, bias, k, scoring, n_group, topk_group, num_experts, group_fill)
    T = logits.shape[0]
    w_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    new = lambda *shape: logits.new_empty(*shape, dtype=torch.int64)
    return logits.new_empty(T, k, dtype=w_dtype), new(T, k), new(num_experts + 1), new(T * k), new(T * k)


def check(logits, bias, k, scoring, n_group, topk_group, num_experts, group_fill=None):
    _check_route(logits, bias, k, scoring, n_group, topk_group, group_fill)
    if num_experts < 1:
        _check_plan(logits.new_empty(0, 1, dtype=torch.int64), num_experts)


route_plan.register_autograd(route_bwd, setup_context=route_setup)
