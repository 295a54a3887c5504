"""Grouped gate/up GEMM with the activation in its epilogue; its backward twin adds d(act).

Forward, per grouped row s of expert e (token t = src[s] // k):
    g = x[t] W_gate[e]^T + b_gate[e];  u = x[t] W_up[e]^T + b_up[e];  h[s] = act(g, u)
Backward (BACKWARD): also dh = grad_y[s] W_down[e] (K = H as well) and stores h, dg, du for the
input- and weight-gradient GEMMs, so the pre-activations never round-trip through memory.
STORE_PRE (forward for training): also stores the pre-activations u | g as pre (S, 2F) (u only
without a gate), so the backward of `moec.experts_combine` (dh_kernel.py) reads them instead
of recomputing two of its GEMMs.
LoRA (LORA_U/G/D): g, u and dh each may get a low-rank term t[s] L[e] with t (S, r) precomputed
(s x A^T for u and g, s grad_y B_down for dh) and L (E, r, F) a factor's view: r more columns of K.
The token gather is in the A-operand load: no (S, H) permuted copy of x exists.
Bytes (forward): S*H (gathered x, re-read once per n-tile) + touched experts' weights (2*F*H each)
+ S*F written. FLOPs: 2*S*H*F per projection.
"""
import triton
import triton.language as tl

from .fast_launch import launch
from .pdl import launch_kwargs
from .jit_helpers import (GROUP_M, activate, activate_backward, cdiv, expert_tile, grouped_order, ieee, lowrank,
                          lowrank_args, lowrank_ptrs, max_tiles, mma, next_pow2, pdl_release, pdl_wait, weight_desc,
                          weight_tile)


@triton.jit
def gate_up_kernel(x_ptr, src_ptr, offsets_ptr, wu_ptr, wg_ptr, bu_ptr, bg_ptr, gy_ptr, wd_ptr,
                   h_ptr, dg_ptr, du_ptr, pre_ptr, tu_ptr, lu_ptr, tg_ptr, lg_ptr, td_ptr, ld_ptr,
                   wu_desc, wg_desc, wd_desc, S, E, H, F, k_top, alpha, limit, M_TILES,
                   s_xt, s_xh, s_wu_e, s_wu_f, s_wu_h, s_wg_e, s_wg_f, s_wg_h,
                   s_bu_e, s_bu_f, s_bg_e, s_bg_f, s_gy, s_pre, s_wd_e, s_wd_h, s_wd_f,
                   s_tu, s_lu_e, s_lu_k, s_lu_n, R_U, s_tg, s_lg_e, s_lg_k, s_lg_n, R_G,
                   s_td, s_ld_e, s_ld_k, s_ld_n, R_D,
                   ACT: tl.constexpr, GATED: tl.constexpr, HAS_BU: tl.constexpr,
                   HAS_BG: tl.constexpr, BACKWARD: tl.constexpr, STORE_PRE: tl.constexpr, IEEE: tl.constexpr,
                   LORA_U: tl.constexpr, LORA_G: tl.constexpr, LORA_D: tl.constexpr,
                   TMA_U: tl.constexpr, K_LAST_U: tl.constexpr, TMA_G: tl.constexpr, K_LAST_G: tl.constexpr,
                   TMA_D: tl.constexpr, K_LAST_D: tl.constexpr, E_POW2: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    n_n = tl.cdiv(F, BLOCK_N)
    tile, pid_n = grouped_order(tl.program_id(0), n_n, M_TILES, GROUP_M)
    e, row0, row_end = expert_tile(tile, offsets_ptr, E, S, BLOCK_M, E_POW2, False)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    tok = (tl.load(src_ptr + rows, mask=rmask, other=0) // k_top).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n0 = pid_n * BLOCK_N
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < H
        amask = rmask[:, None] & kmask[None, :]
        a = tl.load(x_ptr + tok[:, None] * s_xt + kk[None, :] * s_xh, mask=amask, other=0.0)
        b = weight_tile(wu_ptr, wu_desc, e, e64, k0, n0, kk, cols, kmask, cmask, s_wu_e, s_wu_h, s_wu_f, TMA_U,
                        K_LAST_U, BLOCK_K, BLOCK_N)
        acc_u = mma(a, b, acc_u, IEEE)
        if GATED:
            b = weight_tile(wg_ptr, wg_desc, e, e64, k0, n0, kk, cols, kmask, cmask, s_wg_e, s_wg_h, s_wg_f, TMA_G,
                            K_LAST_G, BLOCK_K, BLOCK_N)
            acc_g = mma(a, b, acc_g, IEEE)
        if BACKWARD:
            a = tl.load(gy_ptr + rows[:, None].to(tl.int64) * s_gy + kk[None, :], mask=amask, other=0.0)
            b = weight_tile(wd_ptr, wd_desc, e, e64, k0, n0, kk, cols, kmask, cmask, s_wd_e, s_wd_h, s_wd_f, TMA_D,
                            K_LAST_D, BLOCK_K, BLOCK_N)
            acc_d = mma(a, b, acc_d, IEEE)
    pdl_release(PDL)    # after the K loop: dependents never hold slots this grid's later waves need
    rows64 = rows.to(tl.int64)
    if LORA_U:
        acc_u = lowrank(acc_u, tu_ptr, s_tu, rows64, rmask, lu_ptr, e64, s_lu_e, s_lu_k, s_lu_n, cols, cmask,
                        R_U, IEEE, BLOCK_K)
    if LORA_G:
        acc_g = lowrank(acc_g, tg_ptr, s_tg, rows64, rmask, lg_ptr, e64, s_lg_e, s_lg_k, s_lg_n, cols, cmask,
                        R_G, IEEE, BLOCK_K)
    if LORA_D:
        acc_d = lowrank(acc_d, td_ptr, s_td, rows64, rmask, ld_ptr, e64, s_ld_e, s_ld_k, s_ld_n, cols, cmask,
                        R_D, IEEE, BLOCK_K)
    if HAS_BU:
        acc_u += tl.load(bu_ptr + e64 * s_bu_e + cols * s_bu_f, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BG:
        acc_g += tl.load(bg_ptr + e64 * s_bg_e + cols * s_bg_f, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = rows[:, None].to(tl.int64) * F + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if STORE_PRE:
        pre = pre_ptr + rows[:, None].to(tl.int64) * s_pre + cols[None, :]
        tl.store(pre, acc_u.to(pre_ptr.dtype.element_ty), mask=omask)
        if GATED:
            tl.store(pre + F, acc_g.to(pre_ptr.dtype.element_ty), mask=omask)
    h = activate(acc_g, acc_u, alpha, limit, ACT, GATED)
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=omask)
    if BACKWARD:
        dg, du = activate_backward(acc_g, acc_u, acc_d, alpha, limit, ACT, GATED)
        tl.store(du_ptr + out, du.to(du_ptr.dtype.element_ty), mask=omask)
        if GATED:
            tl.store(dg_ptr + out, dg.to(dg_ptr.dtype.element_ty), mask=omask)


def launch_gate_up(x, src, offsets, k, w_up, w_gate, b_up, b_gate, act_code, alpha, limit, tile,
                   h, grad_y=None, w_down=None, dg=None, du=None, lora_u=None, lora_g=None, lora_d=None,
                   pre=None, pdl=False):
    """Fill h (S, F) and, given grad_y and w_down, dg and du (S, F) too; given pre (S, 2F, or F
    without a gate, contiguous), the pre-activations u | g. lora_u/g/d: (t (S, r), L (E, r, F))
    adding t L[e] to u, g or dh."""
    S, (E, F, H) = src.shape[0], w_up.shape
    backward = grad_y is not None
    gated = w_gate is not None
    wg = w_gate if gated else w_up      # read as w_up's twin for its strides; its pointer only where gated
    if S == 0:
        return
    m_tiles = max_tiles(S, E, tile.block_m)
    grid = (m_tiles * cdiv(F, tile.block_n),)
    # the kernel reads each weight as (E, K = H, N = F)
    d_u, kl_u = weight_desc(w_up, tile, transpose=True)
    d_g, kl_g = weight_desc(w_gate, tile, transpose=True) if gated else (None, False)
    d_d, kl_d = weight_desc(w_down, tile) if backward else (None, False)
    launch(gate_up_kernel, grid,
        x, src, offsets, w_up, w_gate, b_up, b_gate, grad_y, w_down if backward else None, h, dg,
        du if backward else None, pre,
        *lowrank_ptrs(lora_u), *lowrank_ptrs(lora_g), *lowrank_ptrs(lora_d), d_u, d_g, d_d,
        S, E, H, F, k, alpha, limit, m_tiles,
        x.stride(0), x.stride(1), *w_up.stride(), *wg.stride(),
        *(b_up.stride() if b_up is not None else (0, 0)), *(b_gate.stride() if b_gate is not None else (0, 0)),
        grad_y.stride(0) if backward else 0, pre.stride(0) if pre is not None else 0,
        *(w_down.stride() if backward else (0, 0, 0)),
        *lowrank_args(lora_u), *lowrank_args(lora_g), *lowrank_args(lora_d),
        ACT=act_code, GATED=gated, HAS_BU=b_up is not None, HAS_BG=b_gate is not None,
        BACKWARD=backward, STORE_PRE=pre is not None, IEEE=ieee(x), LORA_U=lora_u is not None,
        LORA_G=lora_g is not None,
        LORA_D=lora_d is not None, TMA_U=d_u is not None, K_LAST_U=kl_u, TMA_G=d_g is not None, K_LAST_G=kl_g,
        TMA_D=d_d is not None, K_LAST_D=kl_d, E_POW2=next_pow2(E + 1), GROUP_M=GROUP_M,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **launch_kwargs(pdl))

