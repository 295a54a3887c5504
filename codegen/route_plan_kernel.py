"""Routing and plan in one launch, for decode-size batches: one program routes every token
(route_kernel's route_tokens on a tile of all T rows), then, after a barrier, groups the copies by expert
(plan_single_kernel reading the ids it just wrote). A decode step pays one launch's latency
instead of two; larger batches take the two ops' own launches (route: a program per token
block; plan: count + scatter over blocks), which one program would serialise.
"""
import torch
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import next_pow2, pdl_enter
from .pdl import launch_kwargs, use as use_pdl
from .plan_kernel import plan_launch, plan_single_kernel
from .route_kernel import route_launch, route_settings, route_tokens

MAX_TOKENS = 16         # one program's tile of the router (E_POW2 * T scores) stays small
MAX_COPIES = 128        # plan_single's chunks: at most 4 of 32 copies at E = 128
SORT = True             # top-k by one sort, not k argmax rounds: won or tied in every chained layer (stop 37)


@triton.jit
def route_plan_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, offsets_ptr, src_ptr, inv_ptr, T, E, s_l, scale,
                      topk_group, fill, K: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr,
                      RENORM: tl.constexpr, N_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr, FILL: tl.constexpr,
                      BLOCK_T: tl.constexpr,
                      E_POW2: tl.constexpr, K_POW2: tl.constexpr, SUB: tl.constexpr, PLAN_E_POW2: tl.constexpr,
                      SORT: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    route_then_plan(logits_ptr, bias_ptr, w_ptr, ids_ptr, offsets_ptr, src_ptr, inv_ptr, T, E, s_l, scale, topk_group,
                    fill, K, SCORING, HAS_BIAS, RENORM, N_GROUP, GROUP_TOP2, FILL, BLOCK_T, E_POW2, K_POW2, SUB,
                    PLAN_E_POW2, SORT)


@triton.jit
def route_then_plan(logits_ptr, bias_ptr, w_ptr, ids_ptr, offsets_ptr, src_ptr, inv_ptr, T, E, s_l, scale,
                    topk_group, fill, K: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr,
                    RENORM: tl.constexpr, N_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr, FILL: tl.constexpr,
                    BLOCK_T: tl.constexpr, E_POW2: tl.constexpr, K_POW2: tl.constexpr, SUB: tl.constexpr,
                    PLAN_E_POW2: tl.constexpr, SORT: tl.constexpr):
    """route_plan_kernel's work in one program (router_plan_kernel's last program does it too)."""
    route_tokens(0, logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, s_l, scale, topk_group, fill, K, SCORING, HAS_BIAS,
                 RENORM, N_GROUP, GROUP_TOP2, FILL, BLOCK_T, E_POW2, K_POW2, SORT)
    tl.debug_barrier()      # the ids in global memory, written by all of this program's threads
    plan_single_kernel(ids_ptr, offsets_ptr, src_ptr, inv_ptr, T * K, E, SUB, PLAN_E_POW2)


def takes(T: int, k: int) -> bool:
    """Whether T tokens routed top-k fit one program's routing and plan."""
    return 0 < T <= MAX_TOKENS and T * k <= MAX_COPIES


def outputs(T, k, E, device):
    """Empty (w (T, k) float32, ids (T, k) int64, offsets (E+1,), src (T*k,), inv (T*k,)) for one launch to fill."""
    new = lambda *shape: torch.empty(*shape, dtype=torch.int64, device=device)     # noqa: E731
    return torch.empty(T, k, dtype=torch.float32, device=device), new(T, k), new(E + 1), new(T * k), new(T * k)


def plan_settings(T, k, E):
    """route_then_plan's tile settings beside route_settings'."""
    return dict(BLOCK_T=next_pow2(T), SUB=max(8, min(32, next_pow2(T * k))), PLAN_E_POW2=next_pow2(E + 1))


def route_plan_launch(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, num_experts,
                      group_fill=None):
    """-> (w (T, k) float32, ids (T, k) int64, offsets (E+1,), src (S,), inv (S,)), as route_launch
    then plan_launch give them."""
    T, E = logits.shape
    if not takes(T, k) or num_experts != E:
        w, ids = route_launch(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, group_fill)
        return (w, ids, *plan_launch(ids, num_experts))
    out = outputs(T, k, E, logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    launch(route_plan_kernel, (1,),
        logits, bias, *out, T, E, logits.stride(0), scale,
        topk_group, 0.0 if group_fill is None else group_fill, **plan_settings(T, k, E),
        num_warps=max(1, min(4, next_pow2(T) * next_pow2(E) // 256)),
        **route_settings(E, k, scoring, renormalize, bias is not None, n_group, group_fill, SORT),
        **launch_kwargs(use_pdl(logits, T)))
    return out
