"""Grouped GEMM over contiguous grouped rows: C[s] = A1[s] B1[e] (+ A2[s] B2[e]) + bias[e],
plus up to two low-rank terms T1[s] L1[e] + T2[s] L2[e] (LoRA, with their own rank r as K).

Used for the down projection (A1 = h, B1[e] = W_down[e]^T; LoRA T1 = s h A_down^T, L1 = B_down^T)
and for the input gradient of the gate/up projection (A1 = du, B1[e] = W_up[e]; A2 = dg, B2[e] =
W_gate[e]; LoRA T = s du B_up, L = A_up and the same for gate), and, with N = r, for the LoRA
products themselves. B and L operands are read through their strides, so weight views
(transposes, interleaved slices) are never copied.
Rows of dropped copies (past offsets[E]) are written as zeros by the tiles of segment E.
Bytes: S*K per A (re-read once per n-tile) + touched experts' B + S*N written.
"""
import triton
import triton.language as tl

from .fast_launch import launch
from .pdl import launch_kwargs
from .jit_helpers import (GROUP_M, cdiv, expert_tile, grouped_order, ieee, lowrank, lowrank_args, lowrank_ptrs,
                          ensure_allocator, max_tiles, mma, next_pow2, pdl_release, pdl_wait, rows_readable,
                          weight_desc, weight_tile)


@triton.jit
def down_kernel(a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr, offsets_ptr, t1_ptr, l1_ptr, t2_ptr, l2_ptr,
                b1_desc, b2_desc, S, E, N, K, M_TILES, s_a1, s_b1_e, s_b1_k, s_b1_n, s_a2, s_b2_e, s_b2_k, s_b2_n,
                s_bias_e, s_bias_n, s_c, s_t1, s_l1_e, s_l1_k, s_l1_n, R1, s_t2, s_l2_e, s_l2_k, s_l2_n, R2,
                HAS_A2: tl.constexpr, HAS_BIAS: tl.constexpr, LR1: tl.constexpr, LR2: tl.constexpr,
                TMA1: tl.constexpr, K_LAST1: tl.constexpr, TMA2: tl.constexpr, K_LAST2: tl.constexpr,
                IEEE: tl.constexpr, E_POW2: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                ROW_DESC: tl.constexpr = False):
    pdl_wait(PDL)
    n_n = tl.cdiv(N, BLOCK_N)
    tile, pid_n = grouped_order(tl.program_id(0), n_n, M_TILES, GROUP_M)
    e, row0, row_end = expert_tile(tile, offsets_ptr, E, S, BLOCK_M, E_POW2, True)
    if e < 0:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if e < E:
        e64 = e.to(tl.int64)
        n0 = pid_n * BLOCK_N
        if ROW_DESC:    # A's rows through descriptors clipped at the segment's end: TMA zero-fills the rest
            a1_desc = tl.make_tensor_descriptor(a1_ptr, shape=[row_end.to(tl.int32), K], strides=[s_a1, 1],
                                                block_shape=[BLOCK_M, BLOCK_K])
            if HAS_A2:
                a2_desc = tl.make_tensor_descriptor(a2_ptr, shape=[row_end.to(tl.int32), K], strides=[s_a2, 1],
                                                    block_shape=[BLOCK_M, BLOCK_K])
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            amask = rmask[:, None] & kmask[None, :]
            if ROW_DESC:
                a = a1_desc.load([row0.to(tl.int32), k0])
            else:
                a = tl.load(a1_ptr + rows64[:, None] * s_a1 + kk[None, :], mask=amask, other=0.0)
            b = weight_tile(b1_ptr, b1_desc, e, e64, k0, n0, kk, cols, kmask, cmask, s_b1_e, s_b1_k, s_b1_n,
                            TMA1, K_LAST1, BLOCK_K, BLOCK_N)
            acc = mma(a, b, acc, IEEE)
            if HAS_A2:
                if ROW_DESC:
                    a = a2_desc.load([row0.to(tl.int32), k0])
                else:
                    a = tl.load(a2_ptr + rows64[:, None] * s_a2 + kk[None, :], mask=amask, other=0.0)
                b = weight_tile(b2_ptr, b2_desc, e, e64, k0, n0, kk, cols, kmask, cmask, s_b2_e, s_b2_k, s_b2_n,
                                TMA2, K_LAST2, BLOCK_K, BLOCK_N)
                acc = mma(a, b, acc, IEEE)
        pdl_release(PDL)    # after the K loop (gate_up_kernel.py says why)
        if LR1:
            acc = lowrank(acc, t1_ptr, s_t1, rows64, rmask, l1_ptr, e64, s_l1_e, s_l1_k, s_l1_n, cols, cmask,
                          R1, IEEE, BLOCK_K)
        if LR2:
            acc = lowrank(acc, t2_ptr, s_t2, rows64, rmask, l2_ptr, e64, s_l2_e, s_l2_k, s_l2_n, cols, cmask,
                          R2, IEEE, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e64 * s_bias_e + cols * s_bias_n, mask=cmask,
                           other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows64[:, None] * s_c + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def launch_down(a1, b1, c, offsets, tile, a2=None, b2=None, bias=None, lr1=None, lr2=None, pdl=False):
    """c (S, N) = grouped a1 (S, K) @ b1 (E, K, N) [+ a2 @ b2] [+ bias (E, N)] [+ t @ L for each
    lr = (t (S, r), L (E, r, N))]; b's and L's may be views."""
    S, N = c.shape
    E, K = b1.shape[0], b1.shape[1]
    if S == 0:
        return
    m_tiles = max_tiles(S, E + 1, tile.block_m)
    grid = (m_tiles * cdiv(N, tile.block_n),)
    d1, k_last1 = weight_desc(b1, tile)
    d2, k_last2 = weight_desc(b2, tile) if a2 is not None else (None, False)
    row_desc = tile.row_descs and rows_readable(a1, a2 if a2 is not None else a1) and not pdl
    if row_desc:
        ensure_allocator()
    launch(down_kernel, grid,
        a1, b1, a2, b2, bias, c, offsets, *lowrank_ptrs(lr1), *lowrank_ptrs(lr2), d1, d2, S, E, N, K, m_tiles,
        a1.stride(0), *b1.stride(), *((a2.stride(0), *b2.stride()) if a2 is not None else (0, 0, 0, 0)),
        *(bias.stride() if bias is not None else (0, 0)), c.stride(0), *lowrank_args(lr1), *lowrank_args(lr2),
        HAS_A2=a2 is not None, HAS_BIAS=bias is not None, LR1=lr1 is not None, LR2=lr2 is not None,
        TMA1=d1 is not None, K_LAST1=k_last1, TMA2=d2 is not None, K_LAST2=k_last2, IEEE=ieee(c),
        E_POW2=next_pow2(E + 1), GROUP_M=GROUP_M, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, num_warps=tile.num_warps, num_stages=tile.num_stages, **launch_kwargs(pdl),
        **({"ROW_DESC": True} if row_desc else {}))

