"""The router's logits for a decode-size batch: logits (T, E) = x (T, H) W (E, H)^T (+ b), T <= 16.

Why: at one token the router is a GEMV over 0.06-0.5 MB of weights, and cuBLAS's kernel for it
took 4.7 us on an H100 (Qwen3, 128 x 2048: 0.1 TB/s, benchmarks/results/stop34_h100), 10% of the
whole layer, before any expert weight can stream. Here E / BLOCK_E programs each stream BLOCK_E
rows of W through an MMA tile whose 16 rows are the tokens (zero past T), the loads pipelined by
Triton (num_stages), and write their logits in x's dtype, as F.linear rounds them.
"""
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import cdiv, ieee, mma, pdl_enter
from .pdl import launch_kwargs

MAX_TOKENS = 16


@triton.jit
def router_kernel(x_ptr, w_ptr, b_ptr, out_ptr, T, E, H, s_xt, s_we, s_out, HAS_BIAS: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    ts = tl.arange(0, 16)
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    tmask, emask = ts < T, es < E
    acc = tl.zeros((16, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        a = tl.load(x_ptr + ts[:, None].to(tl.int64) * s_xt + hs[None, :], mask=tmask[:, None] & hmask[None, :],
                    other=0.0)
        b = tl.load(w_ptr + es[None, :].to(tl.int64) * s_we + hs[:, None], mask=hmask[:, None] & emask[None, :],
                    other=0.0)
        acc = mma(a, b, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + es, mask=emask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + ts[:, None].to(tl.int64) * s_out + es[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & emask[None, :])


def router_launch(x, weight, bias, out, settings, pdl=False):
    """out (T, E) = x (T, H) @ weight (E, H)^T (+ bias); rows of x and weight contiguous along H.
    settings: (block_e, block_h, num_warps, num_stages)."""
    T, H = x.shape
    E = weight.shape[0]
    block_e, block_h, warps, stages = settings
    launch(router_kernel, (cdiv(E, block_e),), x, weight, bias, out, T, E, H, x.stride(0), weight.stride(0),
           out.stride(0), HAS_BIAS=bias is not None, IEEE=ieee(x), BLOCK_E=block_e, BLOCK_H=block_h,
           num_warps=warps, num_stages=stages, **launch_kwargs(pdl))
    return out
