"""h = act(g, u) from pre-activations a grouped GEMM wrote: the activation a CUTLASS GEMM cannot
take in its epilogue (`torch._grouped_mm` has none), as one pass over pre.

pre (S, 2F) holds u and g side by side in the gate/up base's column order (u_start, g_start),
or u alone (S, F) for a plain activation; h (S, F). Rows from offsets[E] on (capacity mode's
dropped copies, which the grouped GEMM leaves unwritten) get zeros, as the fused kernel's would.
Bytes: 2F + F elements read and written per row; no FLOPs worth counting.
"""
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import activate, cdiv, next_pow2


@triton.jit
def act_kernel(pre_ptr, h_ptr, offsets_ptr, S, F, E, s_pre, s_h, u_start, g_start, alpha, limit,
               ACT: tl.constexpr, GATED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    end = tl.load(offsets_ptr + E)
    live = rows < end
    cmask = cols < F
    smask = (rows < S)[:, None] & cmask[None, :]
    lmask = live[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    u = tl.load(pre_ptr + r64 * s_pre + u_start + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
    g = u
    if GATED:
        g = tl.load(pre_ptr + r64 * s_pre + g_start + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
    h = tl.where(lmask, activate(g, u, alpha, limit, ACT, GATED), 0.0)
    tl.store(h_ptr + r64 * s_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=smask)


def activate_rows(pre, h, offsets, u_start, g_start, act_code, alpha, limit, gated):
    """Fill h (S, F) from pre; columns of both contiguous. -> h"""
    S, F = h.shape
    if S == 0 or F == 0:
        return h
    block_f = min(next_pow2(F), 128 if h.is_cuda else 32)
    launch(act_kernel, (cdiv(S, 32), cdiv(F, block_f)), pre, h, offsets, S, F, offsets.shape[0] - 1, pre.stride(0),
           h.stride(0), u_start, g_start, float(alpha), float(limit), ACT=act_code, GATED=gated, BLOCK_R=32,
           BLOCK_F=block_f, num_warps=4)
    return h
