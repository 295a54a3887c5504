"""Gather-and-sum of each token's k grouped rows: out[t] = sum_j w[t, j] * y[inv[t*k + j]].

Deterministic (fixed j order, fp32 accumulation), no atomics. Without weights it is the
token-wise reduction of the input-gradient rows in the experts' backward (dx[t] = sum_j rows).
Bytes: T*k*H read + T*H written (+ T*k weights and slots).
"""
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import cdiv, next_pow2, pdl_enter
from .pdl import launch_kwargs


@triton.jit
def combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, T, H, s_y, s_out,
                   K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                   PDL: tl.constexpr = False):
    pdl_enter(PDL)
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tmask, hmask = ts < T, hs < H
    mask = tmask[:, None] & hmask[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(K):
        slot = tl.load(inv_ptr + ts * K + j, mask=tmask, other=0).to(tl.int64)
        row = tl.load(y_ptr + slot[:, None] * s_y + hs[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            row *= tl.load(w_ptr + ts * K + j, mask=tmask, other=0.0).to(tl.float32)[:, None]
        acc += row
    tl.store(out_ptr + ts[:, None].to(tl.int64) * s_out + hs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def combine_launch(y, inv, weights, out, k, block_t=None, block_h=None, pdl=False):
    """out (T, H) = sum over each token's k rows of y (S, H) at inv, times weights (T, k) if given."""
    T, H = out.shape
    if T == 0 or H == 0:
        return out
    block_h = block_h or min(next_pow2(H), 256 if y.is_cuda else 64)
    block_t = block_t or max(1, min(16 if y.is_cuda else 8, 4096 // block_h))
    grid = (cdiv(T, block_t), cdiv(H, block_h))
    w = weights.contiguous() if weights is not None else None
    launch(combine_kernel, grid, y, inv.contiguous(), w, out, T, H, y.stride(0), out.stride(0), K=k,
           HAS_W=weights is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4, **launch_kwargs(pdl))
    return out
