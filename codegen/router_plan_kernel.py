"""A decode step's router GEMM, routing and plan in one launch: logits = x W_r^T (+ b_r), then
route_plan_kernel's work, so the step pays one launch's latency before the experts instead of two.

Why: at one token the router (a GEMV over E x H weights) and route_plan are a chain of two short
launches before any expert weight streams: cuBLAS's GEMV 4.7 us and route_plan 4.0 us of a
Qwen3 layer's 44.8 us against a 25 us floor (H100, stop 34). A Triton GEMV alone saved ~1 us
(stop 34, dropped); this one also drops route_plan's launch.

How: program p computes logits[:, p*BLOCK_E ...] for every token (the T <= 16 tokens as rows of one
MMA tile, as decode_experts_kernel does), stores them, and takes a ticket from a counter; the
program that takes the last ticket routes and plans (route_plan_kernel's code) from the logits all
programs stored. No program waits on another (no grid barrier), so it cannot deadlock however the
programs are scheduled, and the interpreter, which runs them one after another, runs it as is.
The counter is zero before a launch and zero after it (the last program zeroes it): the caller
makes one per launch (a memset) or keeps one for launches that never overlap (`ticket=`). Logits are stored in x's dtype, as a linear
layer returns them (their products summed in float32 in another order than cuBLAS's: the last bit
may differ, as between any two GEMMs).

`moec.router_plan` (router_plan_op.py) runs it, emitted by passes/fuse_router.py with MOEC_ROUTER_PLAN=1.
Off by default: on an H100 (stop 37) this launch beat the two by ~0.8 us only with a kept counter; with the
memset of a fresh one every layer was slower (Qwen3, one token: 45.6 against 44.2 us a layer).
"""
import torch
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import cdiv, ieee, mma, next_pow2, pdl_enter
from .pdl import launch_kwargs, use as use_pdl
from .route_kernel import route_settings
from .route_plan_kernel import MAX_TOKENS, outputs, plan_settings, route_then_plan, takes

assert MAX_TOKENS <= 16     # the tokens are the rows of one 16-row MMA tile


@triton.jit
def router_plan_kernel(x_ptr, wr_ptr, br_ptr, logits_ptr, ticket_ptr, bias_ptr, w_ptr, ids_ptr, offsets_ptr, src_ptr,
                       inv_ptr, T, E, H, s_xt, s_we, s_wh, scale, topk_group, fill,
                       K: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
                       N_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr, FILL: tl.constexpr, BLOCK_T: tl.constexpr,
                       E_POW2: tl.constexpr, K_POW2: tl.constexpr, SUB: tl.constexpr, PLAN_E_POW2: tl.constexpr,
                       SORT: tl.constexpr, HAS_RB: tl.constexpr, IEEE: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    rows = tl.arange(0, 16)
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask, emask = rows < T, es < E
    acc = tl.zeros((16, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        xa = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_xt + hs[None, :], mask=rmask[:, None] & hmask[None, :],
                     other=0.0)
        wb = tl.load(wr_ptr + es[None, :].to(tl.int64) * s_we + hs[:, None] * s_wh,
                     mask=hmask[:, None] & emask[None, :], other=0.0)
        acc = mma(xa, wb, acc, IEEE)
    if HAS_RB:
        acc += tl.load(br_ptr + es, mask=emask, other=0.0).to(tl.float32)[None, :]
    tl.store(logits_ptr + rows[:, None] * E + es[None, :], acc.to(logits_ptr.dtype.element_ty),
             mask=rmask[:, None] & emask[None, :])
    tl.debug_barrier()      # every thread's logits stored before the ticket releases them
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:       # the last program: all logits are out
        tl.debug_barrier()
        route_then_plan(logits_ptr, bias_ptr, w_ptr, ids_ptr, offsets_ptr, src_ptr, inv_ptr, T, E, E, scale,
                        topk_group, fill, K, SCORING, HAS_BIAS, RENORM, N_GROUP, GROUP_TOP2, FILL, BLOCK_T, E_POW2,
                        K_POW2, SUB, PLAN_E_POW2, SORT)
        tl.store(ticket_ptr, 0)     # zero again: a counter kept for the next launch needs no memset


def router_plan_launch(x, w_router, b_router, bias, k, scoring, renormalize, scale, n_group, topk_group,
                       group_fill=None, sort=False, block_e=16, block_h=256, num_warps=4, ticket=None):
    """-> (logits (T, E) in x's dtype, w (T, k) float32, ids (T, k) int64, offsets (E+1,), src (T*k,),
    inv (T*k,)): what `x @ w_router.T (+ b_router)` then `moec.route_plan` give, for `takes` batches.
    w_router (E, H) any strides; b_router (E,) or None (a router's bias); bias: the score bias.
    ticket: an int32 counter holding 0, for a caller whose launches never overlap (one stream, or
    one CUDA graph replayed at a time); None: a fresh zeroed one (a memset launch before)."""
    T, H = x.shape
    E = w_router.shape[0]
    if not takes(T, k):
        raise ValueError(f"router_plan_launch: {T} tokens x top-{k} is not a decode batch (see takes)")
    if x.stride(1) != 1:
        x = x.contiguous()
    logits = torch.empty(T, E, dtype=x.dtype, device=x.device)
    out = outputs(T, k, E, x.device)
    ticket = torch.zeros(1, dtype=torch.int32, device=x.device) if ticket is None else ticket
    block_e = min(block_e, next_pow2(E))
    launch(router_plan_kernel, (cdiv(E, block_e),),
        x, w_router, b_router, logits, ticket, bias, *out, T, E, H, x.stride(0),
        *w_router.stride(), scale, topk_group, 0.0 if group_fill is None else group_fill, **plan_settings(T, k, E),
        HAS_RB=b_router is not None, IEEE=ieee(x), BLOCK_E=block_e, BLOCK_H=min(block_h, next_pow2(H)),
        num_warps=num_warps, **launch_kwargs(use_pdl(x, T)),
        **route_settings(E, k, scoring, renormalize, bias is not None, n_group, group_fill, sort))
    return (logits, *out)
