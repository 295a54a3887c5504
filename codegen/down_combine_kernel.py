"""Decode: the down projection and the combine in one launch,
out[t] = sum_j w[t, j] (h[s_j] W_down[e_j]^T + b_down[e_j]), s_j = inv[t*k + j] the grouped row of
the token's j-th copy, e_j its expert.

At a few tokens the layer is a handful of launches whose latency, not their bytes, sets the step
time (a 1-token Qwen3-30B-A3B layer: 63 us under CUDA graphs for a 25 us floor, six launches): this
removes one, and y (S, H) never exists. One program per (token, H-block) walks the token's k copies
in a fixed order (deterministic, no atomics), each a GEMV over F on that expert's W_down columns.
A token reads its experts' weights on its own, so once tokens share experts (T*k beyond ~E) the
grouped down GEMM + combine read fewer bytes: `experts_combine_forward` takes this path for few
tokens only. Dropped copies (past offsets[E]) add nothing, as their zero rows of y would.
Bytes: T*k*H*F weight elements (each copy's expert, read per token) + T*k*F activations + T*H out.
"""
import triton
import triton.language as tl

from .jit_helpers import cdiv, next_pow2


@triton.jit
def down_combine_kernel(h_ptr, wd_ptr, bd_ptr, inv_ptr, w_ptr, offsets_ptr, out_ptr, E, H, F, s_h,
                        s_wd_e, s_wd_h, s_wd_f, s_bd_e, s_bd_h, s_out, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        E_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < H
    i = tl.arange(0, E_POW2)
    ends = tl.load(offsets_ptr + 1 + i, mask=i < E, other=0)     # segment i ends at ends[i]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(K):
        slot = tl.load(inv_ptr + t * K + j)
        e = tl.sum(((ends <= slot) & (i < E)).to(tl.int32), axis=0)     # E: a dropped copy
        if e < E:
            e64 = e.to(tl.int64)
            part = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for f0 in range(0, F, BLOCK_K):
                ff = f0 + tl.arange(0, BLOCK_K)
                fmask = ff < F
                hv = tl.load(h_ptr + slot * s_h + ff, mask=fmask, other=0.0).to(tl.float32)
                wv = tl.load(wd_ptr + e64 * s_wd_e + cols[None, :] * s_wd_h + ff[:, None] * s_wd_f,
                             mask=fmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                part += tl.sum(hv[:, None] * wv, axis=0)
            if HAS_BIAS:
                part += tl.load(bd_ptr + e64 * s_bd_e + cols * s_bd_h, mask=cmask, other=0.0).to(tl.float32)
            acc += tl.load(w_ptr + t * K + j).to(tl.float32) * part
    tl.store(out_ptr + t * s_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def launch_down_combine(h, w_down, b_down, inv, route_w, offsets, out, k, block_n=None, block_k=None):
    """out (T, H) = the combine of the down projection of h (S, F) grouped; w_down (E, H, F) and
    b_down (E, H) views of any strides; route_w (T, k); inv (S,) as `moec.plan` gives it."""
    T, H = out.shape
    E, F = w_down.shape[0], w_down.shape[2]
    if T == 0:
        return out
    block_n = block_n or (32 if h.is_cuda else 16)
    block_k = block_k or min(next_pow2(F), 128 if h.is_cuda else 32)
    down_combine_kernel[(T, cdiv(H, block_n))](
        h, w_down, b_down if b_down is not None else w_down, inv, route_w.contiguous(), offsets, out, E, H, F,
        h.stride(0), *w_down.stride(), *(b_down.stride() if b_down is not None else (0, 0)), out.stride(0),
        K=k, HAS_BIAS=b_down is not None, E_POW2=next_pow2(E), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
