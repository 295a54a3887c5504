"""Backward of combine: grad_y[inv[c]] = w[c] * grad_out[t] and grad_w[c] = <y[inv[c]], grad_out[t]>.

One program per (block of tokens, j); it streams H in chunks. inv is a permutation of the S
slots, so every row of grad_y is written exactly once: no zero-fill, no atomics.
Bytes: 2*T*k*H read (y rows, grad_out re-read per j from L2) + T*k*H written.
"""
import torch
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import cdiv, next_pow2


@triton.jit
def combine_backward_kernel(go_ptr, y_ptr, inv_ptr, w_ptr, gy_ptr, gw_ptr, T, H, K, s_go, s_y, s_gy,
                            BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1)
    tmask = ts < T
    c = ts * K + j
    slot = tl.load(inv_ptr + c, mask=tmask, other=0).to(tl.int64)
    w = tl.load(w_ptr + c, mask=tmask, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        mask = tmask[:, None] & (hs < H)[None, :]
        go = tl.load(go_ptr + ts[:, None].to(tl.int64) * s_go + hs[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + slot[:, None] * s_y + hs[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(go * y, axis=1)
        tl.store(gy_ptr + slot[:, None] * s_gy + hs[None, :], (go * w[:, None]).to(gy_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(gw_ptr + c, dot.to(gw_ptr.dtype.element_ty), mask=tmask)


def combine_backward_launch(grad_out, y, inv, weights):
    T, k = weights.shape
    H = y.shape[1]
    grad_y, grad_w = torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty_like(weights, memory_format=torch.contiguous_format)
    if T == 0:
        return grad_y, grad_w
    block_h = min(next_pow2(max(H, 1)), 256 if y.is_cuda else 64)
    block_t = max(1, min(16 if y.is_cuda else 8, 4096 // block_h))
    grid = (cdiv(T, block_t), k)
    launch(combine_backward_kernel, grid, grad_out, y, inv.contiguous(), weights.contiguous(), grad_y, grad_w, T, H,
           k, grad_out.stride(0), y.stride(0), grad_y.stride(0), BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    return grad_y, grad_w

