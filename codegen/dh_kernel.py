"""Backward of the down projection and the activation, with the combine's backward folded in.

For grouped row s of expert e (copy c = src[s], token t = c // k, routing weight w = w[c]),
from the forward's saved pre-activations u and g (gate_up_kernel STORE_PRE writes u | g, CUTLASS's GEMM
the base's order: grouped_mm_forward.pre_columns):
    d  = grad_out[t] W_down[e]                 (the gather is in the A load: grad_y never exists)
    h  = act(g, u)
    dw[s, n-tile] = sum over the tile's columns of d * h  (+ grad_out[t] . b_down[e] on tile 0)
    dh = w * d;  dg, du = d(act)(g, u, dh);  stores h * w, dg, du
so the router weight's gradient <grad_out[t], y[s]> = <d, h> + <grad_out[t], b_down[e]> needs no
saved y (S, H), and dW_down = grad_out[t]^T (w h) reads grad_out by token too. One accumulator
instead of the recompute twin's three (u, g, d: two of its three GEMMs were the forward again).
Copies past offsets[E] (dropped by capacity) have y = 0: their dw partials are written as 0.
Without ROUTED (`moec.experts_backward` given the pre-activations: expert-parallel local experts,
whose combine is elsewhere): d = grad_y[s] W_down[e] on grouped rows, w = 1, no dw.
With a LoRA factor on the down projection (W_down + s B A), d also gains q[s] A[e], q = s grad_out[t] B
(ROUTED, unweighted) or s grad_y[s] B, (S, r), computed before: r more K-columns.
Bytes: S*H gathered grad_out (re-read per n-tile) + touched W_down + S*2F read + 3*S*F written.
"""
import torch
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import (GROUP_M, activate, activate_backward, cdiv, expert_tile, grouped_order, ieee, lowrank,
                          lowrank_args, lowrank_ptrs, max_tiles, mma, next_pow2, weight_desc, weight_tile)


@triton.jit
def dh_kernel(go_ptr, src_ptr, offsets_ptr, wd_ptr, bd_ptr, pre_ptr, w_ptr, hw_ptr, dg_ptr, du_ptr, dw_ptr,
              td_ptr, ld_ptr, wd_desc, S, E, H, F, k_top, alpha, limit, M_TILES, s_go, s_wd_e, s_wd_h, s_wd_f, s_bd_e, s_bd_h,
              s_pre, s_g, s_gu, s_td, s_ld_e, s_ld_k, s_ld_n, R_D,
              ACT: tl.constexpr, GATED: tl.constexpr, HAS_BD: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
              ROUTED: tl.constexpr, LORA_D: tl.constexpr, TMA: tl.constexpr, K_LAST: tl.constexpr,
              E_POW2: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n_n = tl.cdiv(F, BLOCK_N)
    tile, pid_n = grouped_order(tl.program_id(0), n_n, M_TILES, GROUP_M)
    e, row0, row_end = expert_tile(tile, offsets_ptr, E, S, BLOCK_M, E_POW2, True)
    if e < 0:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    rows64 = rows.to(tl.int64)
    dw_out = dw_ptr + rows64 * n_n + pid_n
    if e == E:      # dropped copies: y = 0, so their weights' gradients are 0
        if ROUTED:
            tl.store(dw_out, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=rmask)
    else:
        _expert_rows(go_ptr, src_ptr, wd_ptr, wd_desc, bd_ptr, pre_ptr, w_ptr, hw_ptr, dg_ptr, du_ptr, dw_out, td_ptr,
                     ld_ptr, e, rows, rmask, pid_n, H, F, k_top, alpha, limit, s_go, s_wd_e, s_wd_h, s_wd_f,
                     s_bd_e, s_bd_h, s_pre, s_g, s_gu, s_td, s_ld_e, s_ld_k, s_ld_n, R_D, ACT, GATED, HAS_BD, IEEE, SPLIT,
                     ROUTED, LORA_D, TMA, K_LAST, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _expert_rows(go_ptr, src_ptr, wd_ptr, wd_desc, bd_ptr, pre_ptr, w_ptr, hw_ptr, dg_ptr, du_ptr, dw_out, td_ptr,
                 ld_ptr, e, rows, rmask, pid_n, H, F, k_top, alpha, limit, s_go, s_wd_e, s_wd_h, s_wd_f, s_bd_e, s_bd_h, s_pre,
                 s_g, s_gu, s_td, s_ld_e, s_ld_k, s_ld_n, R_D, ACT: tl.constexpr, GATED: tl.constexpr, HAS_BD: tl.constexpr,
                 IEEE: tl.constexpr, SPLIT: tl.constexpr, ROUTED: tl.constexpr, LORA_D: tl.constexpr,
                 TMA: tl.constexpr, K_LAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows64 = rows.to(tl.int64)
    e64 = e.to(tl.int64)
    tok = rows64                # ROUTED: the token of each copy, whose grad_out row A reads
    w = tl.full((BLOCK_M, 1), 1.0, tl.float32)
    if ROUTED:
        copy = tl.load(src_ptr + rows, mask=rmask, other=0)
        tok = (copy // k_top).to(tl.int64)
        w = tl.load(w_ptr + copy, mask=rmask, other=0.0).to(tl.float32)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < H
        a = tl.load(go_ptr + tok[:, None] * s_go + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = weight_tile(wd_ptr, wd_desc, e, e64, k0, pid_n * BLOCK_N, kk, cols, kmask, cmask, s_wd_e, s_wd_h, s_wd_f,
                        TMA, K_LAST, BLOCK_K, BLOCK_N)
        acc = mma(a, b, acc, IEEE)
    if LORA_D:
        acc = lowrank(acc, td_ptr, s_td, rows64, rmask, ld_ptr, e64, s_ld_e, s_ld_k, s_ld_n, cols, cmask, R_D, IEEE,
                      BLOCK_K)
    if SPLIT == 4:      # four column quarters: a quarter as many of the epilogue's tiles live at once
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        q0, q1 = _halves(left, BLOCK_M, BLOCK_N // 2)
        q2, q3 = _halves(right, BLOCK_M, BLOCK_N // 2)
        first = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 4)
        dw = _epilogue(q0, first, rows64, rmask, w, pre_ptr, hw_ptr, dg_ptr, du_ptr, F, alpha, limit, s_pre, s_g,
                       s_gu, ACT, GATED)
        dw += _epilogue(q1, first + BLOCK_N // 4, rows64, rmask, w, pre_ptr, hw_ptr, dg_ptr, du_ptr, F, alpha, limit,
                        s_pre, s_g, s_gu, ACT, GATED)
        dw += _epilogue(q2, first + BLOCK_N // 2, rows64, rmask, w, pre_ptr, hw_ptr, dg_ptr, du_ptr, F, alpha, limit,
                        s_pre, s_g, s_gu, ACT, GATED)
        dw += _epilogue(q3, first + 3 * (BLOCK_N // 4), rows64, rmask, w, pre_ptr, hw_ptr, dg_ptr, du_ptr, F, alpha,
                        limit, s_pre, s_g, s_gu, ACT, GATED)
    elif SPLIT == 2:    # two column halves: half as many of its tiles live at once
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        first = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        dw = _epilogue(left, first, rows64, rmask, w, pre_ptr, hw_ptr, dg_ptr, du_ptr, F, alpha, limit, s_pre,
                       s_g, s_gu, ACT, GATED)
        dw += _epilogue(right, first + BLOCK_N // 2, rows64, rmask, w, pre_ptr, hw_ptr, dg_ptr, du_ptr, F, alpha,
                        limit, s_pre, s_g, s_gu, ACT, GATED)
    else:
        dw = _epilogue(acc, cols, rows64, rmask, w, pre_ptr, hw_ptr, dg_ptr, du_ptr, F, alpha, limit, s_pre, s_g,
                       s_gu, ACT, GATED)
    if ROUTED:
        if HAS_BD:
            if pid_n == 0:
                dw += _bias_dots(go_ptr, s_go, tok, rmask, bd_ptr + e64 * s_bd_e, s_bd_h, H, BLOCK_M, BLOCK_K)
        tl.store(dw_out, dw, mask=rmask)


@triton.jit
def _halves(t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A (BLOCK_M, BLOCK_N) tile's left and right column halves."""
    return tl.split(tl.permute(tl.reshape(t, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _epilogue(acc, cols, rows64, rmask, w, pre_ptr, hw_ptr, dg_ptr, du_ptr, F, alpha, limit, s_pre, s_g, s_gu,
              ACT: tl.constexpr, GATED: tl.constexpr):
    """Stores w h, dg, du for `cols` of the tile's rows; returns the rows' partial <acc, h>."""
    omask = rmask[:, None] & (cols < F)[None, :]
    pre = pre_ptr + rows64[:, None] * s_pre + cols[None, :]
    u = tl.load(pre, mask=omask, other=0.0).to(tl.float32)
    g = u
    if GATED:
        g = tl.load(pre + s_g, mask=omask, other=0.0).to(tl.float32)
    h = tl.where(omask, activate(g, u, alpha, limit, ACT, GATED), 0.0)
    out = rows64[:, None] * F + cols[None, :]
    tl.store(hw_ptr + out, (h * w).to(hw_ptr.dtype.element_ty), mask=omask)
    dw = tl.sum(acc * h, axis=1)
    dg, du = activate_backward(g, u, acc * w, alpha, limit, ACT, GATED)
    gu = rows64[:, None] * s_gu + cols[None, :]      # du, dg: apart, or side by side in one (S, 2F) buffer
    tl.store(du_ptr + gu, du.to(du_ptr.dtype.element_ty), mask=omask)
    if GATED:
        tl.store(dg_ptr + gu, dg.to(dg_ptr.dtype.element_ty), mask=omask)
    return dw


@triton.jit
def _bias_dots(go_ptr, s_go, tok, rmask, bd_ptr, s_bd_h, H, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_out[tok] . b_down[e] per row, in a loop of its own (see wgrad_kernel's _row_sums: a
    reduction inside the GEMM loop costs the GEMM its pipelining)."""
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < H
        a = tl.load(go_ptr + tok[:, None] * s_go + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(bd_ptr + kk * s_bd_h, mask=kmask, other=0.0)
        total += tl.sum(a.to(tl.float32) * b.to(tl.float32)[None, :], axis=1)
    return total


def _split(tile) -> int:
    """Column pieces of the epilogue (1, 2 or 4), each at least 16 columns wide."""
    split = tile.epilogue_split if tile.epilogue_split in (2, 4) else 1
    while split > 1 and tile.block_n // split < 16:
        split //= 2
    return split


def launch_dh(grad_out, src, offsets, k, w_down, b_down, pre, weights, act_code, alpha, limit, tile, hw, dg, du,
              lora_d=None, pre_cols=None):
    """Fill hw = w h, dg, du (S, F) grouped and return dw (S,) float32 per grouped row (the routing
    weight's gradient, 0 for dropped copies). grad_out (T, H); w_down (E, H, F) any strides; du and dg
    may be column slices of one buffer (du's row stride is read for both);
    pre (S, 2F or F) contiguous; weights (T, k) routing weights; dg None without a gate.
    weights None: grad_out is grad_y (S, H) grouped, hw = h, b_down unused, returns None.
    lora_d = (q (S, r) per grouped row, unweighted, A viewed (E, r, F)) adds down's LoRA term q A.
    pre_cols: (u's first column, g's first column) in pre; (0, F) where None."""
    S, (E, H, F) = src.shape[0], w_down.shape
    n_n = cdiv(F, tile.block_n)
    routed = weights is not None
    dw = grad_out.new_empty(S if routed else 0, n_n, dtype=torch.float32)
    if S == 0:
        return dw.sum(1) if routed else None
    b_down = b_down if routed else None
    m_tiles = max_tiles(S, E + 1, tile.block_m)
    desc, k_last = weight_desc(w_down, tile)       # read as (E, K = H, N = F)
    u0, g0 = pre_cols or (0, F)
    launch(dh_kernel, (m_tiles * n_n,),
        grad_out, src, offsets, w_down, b_down, pre[:, u0:], weights.contiguous() if routed else None, hw, dg, du, dw,
        *lowrank_ptrs(lora_d), desc, S, E, H, F, k, alpha, limit, m_tiles,
        grad_out.stride(0), *w_down.stride(), *(b_down.stride() if b_down is not None else (0, 0)), pre.stride(0), g0 - u0,
        du.stride(0), *lowrank_args(lora_d), ACT=act_code, GATED=dg is not None, HAS_BD=b_down is not None,
        IEEE=ieee(grad_out),
        SPLIT=_split(tile), ROUTED=routed, LORA_D=lora_d is not None,
        TMA=desc is not None, K_LAST=k_last,
        E_POW2=next_pow2(E + 1),
        GROUP_M=GROUP_M, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **({"maxnreg": tile.max_regs} if tile.max_regs else {}))
    return dw.sum(1) if routed else None
