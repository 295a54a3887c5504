"""Zero the rows of dropped copies: rows[offsets[E]:] = 0, without reading offsets on the host.

Why: a grouped GEMM (`torch._grouped_mm`) writes only the rows its groups cover, and capacity
mode's dropped copies sit past offsets[E], where moec's own kernels write zeros (down_kernel.py).
The grid covers every row (an upper bound: no host sync); a program whose rows all lie before
offsets[E], every program in the dropless case, reads one integer and returns.
"""
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import cdiv, next_pow2


@triton.jit
def zero_tail_kernel(rows_ptr, offsets_ptr, S, H, E, s_rows, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r0 = tl.program_id(0) * BLOCK_R
    end = tl.load(offsets_ptr + E)
    if r0 + BLOCK_R <= end:
        return
    rows = r0 + tl.arange(0, BLOCK_R)
    rmask = (rows >= end) & (rows < S)
    base = rows.to(tl.int64)[:, None] * s_rows
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        tl.store(rows_ptr + base + hs[None, :], tl.zeros((BLOCK_R, BLOCK_H), rows_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (hs < H)[None, :])


def zero_tail(rows, offsets):
    """rows (S, H), columns contiguous; offsets (E+1,) on its device -> rows, zeroed from offsets[E] on."""
    S, H = rows.shape
    if S == 0 or H == 0:
        return rows
    block_h = min(next_pow2(H), 256 if rows.is_cuda else 64)
    launch(zero_tail_kernel, (cdiv(S, 32),), rows, offsets, S, H, offsets.shape[0] - 1, rows.stride(0),
           BLOCK_R=32, BLOCK_H=block_h, num_warps=4)
    return rows
