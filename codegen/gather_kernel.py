"""Row gather for the weight gradients' copies: out[r] = a[idx[r] // div] (rows of a contiguous).

Why not `a.index_select(0, idx // div)`: that is two launches (the division, then aten's gather,
written for any dimension and stride), and at Qwen3 widths and 8192 tokens each of the backward's
two (S, H) copies took 159-166 us on an H100, 1.8 TB/s (benchmarks/gather_ab.py times both: 150 us here).
Here a program moves BLOCK_R whole rows, the source rows (T x H, read k times) mostly from L2.
"""
import torch
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import cdiv, next_pow2


@triton.jit
def gather_rows_kernel(a_ptr, idx_ptr, out_ptr, R, H, div, s_a, s_out,
                       BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    src = (tl.load(idx_ptr + rows, mask=rmask, other=0) // div).to(tl.int64)
    dst = rows.to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        mask = rmask[:, None] & (hs < H)[None, :]
        v = tl.load(a_ptr + src[:, None] * s_a + hs[None, :], mask=mask)
        tl.store(out_ptr + dst[:, None] * s_out + hs[None, :], v, mask=mask)


def gather_rows(a, idx, div=1, block_r=None, block_h=None, num_warps=None):
    """(len(idx), H) copy of a's rows idx // div (a (T, H), rows contiguous; idx integer, on a's
    device). The block sizes and warps are benchmarks/gather_ab.py's to vary."""
    if a.dim() != 2 or (a.shape[1] > 1 and a.stride(1) != 1):
        raise ValueError(f"gather_rows: a must be 2-D with contiguous rows, got shape {tuple(a.shape)} "
                         f"strides {a.stride()}")
    if idx.device != a.device or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"gather_rows: idx must be int32 or int64 on {a.device}, got {idx.dtype} on {idx.device}")
    R, H = idx.shape[0], a.shape[1]
    out = a.new_empty(R, H)
    if R == 0 or H == 0:
        return out
    # (32, 256) in eight warps: the fastest of five settings on every layer measured, 5-13% under aten
    # (H100, 2026-12-06, results/stop29_h100/part1/gather_ab.md)
    block_h = block_h or min(next_pow2(H), 256 if a.is_cuda else 64)
    block_r = block_r or 32
    num_warps = num_warps or (8 if a.is_cuda else 4)
    launch(gather_rows_kernel, (cdiv(R, block_r),), a, idx.contiguous(), out, R, H, div, a.stride(0),
           out.stride(0), BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps)
    return out
