"""Grouped weight gradients over ragged segments: dW[e] = A_e^T B_e, and bias grads from A.

out[e, m, n] = sum over grouped rows s of expert e of A[s, m] * B[s, n]. Where B is x by token
(src[s] // k), or A is grad_out by token (dW_down in `moec.experts_combine`'s backward), `launch_wgrad`
gathers their rows into a copy first: read through the index inside the K loop they cost the GEMM
half its speed (Qwen3 widths, 4096 tokens, H200: 0.77 ms against 0.37 ms on pre-gathered rows; the
copy is ~0.06 ms; benchmarks/results/bwd_ablation_h200.log). WEIGH_A: the bias sums weigh row s by
its routing weight w[src[s]] (grad_out's rows stand for w-weighted y's). DUAL adds a
second A sharing the B loads (du and dg against x: dW_up and dW_gate in one pass over x).
Experts with no rows get zeros. Bias gradients db[e, m] = sum_s A[s, m], from the n = 0 tiles.
Outputs are written through their strides, so a gradient lands straight in its view of a fused
weight's gradient buffer (HF's gate_up halves, GPT-OSS's transposed interleaved rows). Where m
is the faster dimension in memory (GPT-OSS's (E, H, 2F) gate_up and (E, F, H) down, seen as
(E, F, H) and (E, H, F)), the tile is stored transposed (TRANS_OUT): threads then walk memory
along m instead of writing one element per cache line, which cost 75% of a GPT-OSS train step
on an H100 (9.4 ms per wgrad launch at 4096 tokens).
With Tile.tma (sm90+, every operand TMA-readable) an expert's whole BLOCK_K row blocks come through
descriptors and its partial last block through pointers: OLMoE's dual kernel 0.731 -> 0.706 ms at
4096 tokens on an H100, Qwen3's unchanged (the tuner keeps whichever is faster per layer).
Bytes: per (m, n) tile, rows_e * (BLOCK_M + BLOCK_N) reads; E*M*N written.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from .errors import MoecError
from .fast_launch import launch
from .gather_kernel import gather_rows
from .jit_helpers import (cdiv, ensure_allocator, expert_mn, ieee, mma, next_pow2, rows_readable, store_tile, tma_asked,
                          tma_readable)
from .wgrad_persistent_kernel import wgrad_persistent_kernel
from .wgrad_rowdesc_kernel import wgrad_rowdesc_kernel


@triton.jit
def wgrad_kernel(a_ptr, a2_ptr, b_ptr, src_ptr, offsets_ptr, out_ptr, out2_ptr, db_ptr, db2_ptr, w_ptr,
                 a_desc, a2_desc, b_desc, E, M, N, s_a, s_a2, s_b_row, s_b_col,
                 s_o_e, s_o_m, s_o_n, s_o2_e, s_o2_m, s_o2_n, s_db_e, s_db_m, s_db2_e, s_db2_m,
                 r0, r1, off_a, off_b,
                 WEIGH_A: tl.constexpr, DUAL: tl.constexpr, BIAS: tl.constexpr,
                 BIAS2: tl.constexpr,
                 IEEE: tl.constexpr, TRANS_OUT: tl.constexpr, CHUNKED: tl.constexpr, TMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e, pid_m, pid_n = expert_mn(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    lo, hi = start, end
    write, add = start <= end, start > end        # not chunked: every expert writes
    if CHUNKED:
        # rows r0..r1 only (the gathered copy holds those); an expert is written by the chunk
        # holding its first row (an empty one by the first chunk), and added to by later ones
        lo, hi = tl.maximum(start, r0), tl.minimum(end, r1)
        add = (start < r0) & (lo < hi)
        write = ((start >= r0) & (start < r1) & (start < end)) | ((start == end) & (r0 == 0)) | add
    if not write:
        # a chunk's launch covers every expert's tiles and most have nothing to do: leaving before
        # the epilogue (a (BM, BN) accumulator through shared memory to a masked-off store) is what
        # makes those programs cheap (~150 us a launch of idle epilogues at Qwen3 widths, H100)
        return
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = ms < M, ns < N       # every program past the return writes its tile: mmask says where
    # the add flag as a block over m (the interpreter refuses a scalar flag inside a block's mask)
    amask = mmask & ((tl.zeros((BLOCK_M,), dtype=tl.int32) + add.to(tl.int32)) != 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tail = lo
    if TMA:
        # whole BLOCK_K row blocks of this expert through TMA; the last partial block (whose rows
        # past hi are the next expert's, which a descriptor cannot mask) below, through pointers
        tail = lo + (hi - lo) // BLOCK_K * BLOCK_K
        m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        # descriptors take 32-bit coordinates (rows fit: _row_desc)
        for r in range(lo.to(tl.int32), tail.to(tl.int32), BLOCK_K):
            b = b_desc.load([r - off_b, n0])
            acc = mma(tl.trans(a_desc.load([r - off_a, m0])), b, acc, IEEE)
            if DUAL:
                acc2 = mma(tl.trans(a2_desc.load([r, m0])), b, acc2, IEEE)
    for s0 in tl.range(tail, hi, BLOCK_K, num_stages=1 if TMA else None):
        s = s0 + tl.arange(0, BLOCK_K)
        smask = s < hi
        s64 = s.to(tl.int64)
        b = tl.load(b_ptr + (s64 - off_b)[:, None] * s_b_row + ns[None, :] * s_b_col,
                    mask=smask[:, None] & nmask[None, :], other=0.0)
        a_in = mmask[:, None] & smask[None, :]
        a = tl.load(a_ptr + (s64 - off_a)[None, :] * s_a + ms[:, None], mask=a_in, other=0.0)   # (BM, BK)
        acc = mma(a, b, acc, IEEE)
        if DUAL:
            a = tl.load(a2_ptr + s64[None, :] * s_a2 + ms[:, None], mask=a_in, other=0.0)
            acc2 = mma(a, b, acc2, IEEE)
    e64 = e.to(tl.int64)
    ms64, ns64 = ms.to(tl.int64), ns.to(tl.int64)
    store_tile(out_ptr + e64 * s_o_e, s_o_m, s_o_n, ms64, ns64, mmask, amask, nmask, acc, CHUNKED, TRANS_OUT)
    if DUAL:
        store_tile(out2_ptr + e64 * s_o2_e, s_o2_m, s_o2_n, ms64, ns64, mmask, amask, nmask, acc2, CHUNKED,
                   TRANS_OUT)
    if pid_n == 0:
        # bias sums in a loop of their own: a reduction of A inside the GEMM loop needs the A tiles
        # in registers as well as in the MMA pipeline (GPT-OSS, the shape with biases, trained
        # 4x slower than the same layer's FLOPs predict, 75% of it in this kernel)
        if BIAS:
            _row_sums(a_ptr, s_a, off_a, lo, hi, ms, mmask, amask, db_ptr + e64 * s_db_e + ms64 * s_db_m,
                      src_ptr, w_ptr, WEIGH_A, CHUNKED, BLOCK_M, BLOCK_K)
        if BIAS2:
            _row_sums(a2_ptr, s_a2, 0, lo, hi, ms, mmask, amask, db2_ptr + e64 * s_db2_e + ms64 * s_db2_m,
                      src_ptr, w_ptr, False, CHUNKED, BLOCK_M, BLOCK_K)


@triton.jit
def bias_grad_kernel(a_ptr, s_a, off_a, offsets_ptr, db_ptr, s_db_e, s_db_m, src_ptr, w_ptr, M,
                     WEIGH_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """db[e, m] = sum of expert e's rows of a (w-weighted: WEIGH_A), one program per (e, m block):
    the bias gradients beside the persistent kernel, whose flat loop a second loop over the rows
    would keep from being pipelined. One more read of a: ~60 us of GPT-OSS's ~7 ms step."""
    e = tl.program_id(0)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = ms < M
    _row_sums(a_ptr, s_a, off_a, tl.load(offsets_ptr + e), tl.load(offsets_ptr + e + 1), ms, mmask, mmask,
              db_ptr + e.to(tl.int64) * s_db_e + ms.to(tl.int64) * s_db_m, src_ptr, w_ptr, WEIGH_A, False,
              BLOCK_M, BLOCK_K)


@triton.jit
def _row_sums(a_ptr, s_a, off_a, lo, hi, ms, mmask, amask, out_ptrs, src_ptr, w_ptr, WEIGH_A: tl.constexpr,
              CHUNKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m] (+)= sum of a[s - off_a, m] over rows lo..hi (WEIGH_A: of w[src[s]] a[...]) where
    mmask[m]; amask where it adds to what an earlier chunk wrote."""
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_K):
        s = s0 + tl.arange(0, BLOCK_K)
        smask = s < hi
        a = tl.load(a_ptr + (s.to(tl.int64) - off_a)[None, :] * s_a + ms[:, None],
                    mask=mmask[:, None] & smask[None, :], other=0.0).to(tl.float32)
        if WEIGH_A:
            copy = tl.load(src_ptr + s, mask=smask, other=0)
            a *= tl.load(w_ptr + copy, mask=smask, other=0.0).to(tl.float32)[None, :]
        total += tl.sum(a, axis=1)
    if CHUNKED:
        total += tl.load(out_ptrs, mask=amask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mmask)


# The copy of gathered rows (x's for dW_up | dW_gate, grad_out's for dW_down) can be made and used
# in chunks of at most MOEC_WGRAD_COPY_MIB (a memory-for-time trade, off by default): whole, it is
# S x H beside the weight gradients at the backward's peak (128 MiB a layer at Qwen3 and OLMoE
# widths, 4096 tokens). Each chunk is one launch; an expert whose rows straddle chunks is added to
# by the later ones (one more rounding of its partial sum to the gradient's dtype). At 48 MiB the
# H100 measured (2026-12-05) peaks Qwen3 1474 -> 1394 MiB, OLMoE 1138 -> 1058 (HF grouped_mm +
# torch.compile 1425, 1072), but training steps replayed from CUDA graphs 3.31 -> 4.16 ms (Qwen3),
# 3.52 -> 4.06 (OLMoE), 7.18 -> 7.95 (GPT-OSS), 19.97 -> 21.02 (Mixtral): each chunk's launch runs
# every expert's tiles, most of them idle (the weight gradients 1.03 -> 1.93 ms a Qwen3 step), and
# programs striding over the chunk's experts' tiles alone were slower still on GPT-OSS and Mixtral
# (benchmarks/results/wgrad_chunks_h100.md). Since then idle programs leave before their epilogue:
# 5-8% slower than one copy (Qwen3 3.57 vs 3.31 ms; Mixtral even; stop23_h100/chunks48_early_exit.md).
_ONE_COPY_MIB = 1 << 30        # larger than any copy: one, whatever its size


def _copy_mib_from_env() -> int:
    value = os.environ.get("MOEC_WGRAD_COPY_MIB", "")
    if not value:
        return _ONE_COPY_MIB
    if not value.isdigit() or int(value) == 0:
        raise MoecError(f"MOEC_WGRAD_COPY_MIB={value!r}: expected a positive whole number of MiB (the largest "
                        f"gathered copy the weight gradients make), or unset for one copy")
    return int(value)


MAX_COPY_BYTES = _copy_mib_from_env() << 20


def copy_mib():
    """The chunk size in force, in MiB, or None where the gathered rows are copied whole."""
    mib = MAX_COPY_BYTES >> 20
    return None if mib >= _ONE_COPY_MIB else mib


def launch_wgrad(a, b, offsets, out, tile, src=None, k=1, a2=None, out2=None, db=None, db2=None, gather_a=None):
    """out (E, M, N), any strides = per-expert a (S, M)^T @ b rows; optional dual a2/out2, biases
    db/db2 (E, M); outputs may be views into larger gradient buffers. src: b's rows are tokens,
    gathered (into a copy, in chunks of MAX_COPY_BYTES) by src // k; gather_a = (src, routing
    weights (T, k)) gathers a's instead, its bias sums weighted by w[src[s]]."""
    E, M, N = out.shape
    o2 = out2 if out2 is not None else out
    d1 = db if db is not None else out[:, :, 0]
    d2 = db2 if db2 is not None else d1
    grid = (E * cdiv(M, tile.block_m) * cdiv(N, tile.block_n),)
    trans = abs(out.stride(1)) < abs(out.stride(2))     # out2, where given, is the twin view of one base
    w = gather_a[1].contiguous() if gather_a is not None else None
    if gather_a is not None:
        src = gather_a[0]
    elif src is None:       # nothing to gather: one launch over every row
        _launch(grid, a, a2, b, offsets, offsets, out, o2, d1, d2, a, 0, 0, 0, 0, False, db, db2, trans, tile)
        return
    rows = src.shape[0]
    whole = a if gather_a is not None else b
    chunk = max(1, min(rows, MAX_COPY_BYTES // max(1, whole.shape[1] * whole.element_size())))
    chunked = rows > chunk
    for r0 in range(0, max(rows, 1), chunk):      # no rows: one launch writes the zeros
        r1 = min(rows, r0 + chunk)
        copy = gather_rows(whole, src[r0:r1], k)
        if gather_a is not None:
            _launch(grid, copy, a2, b, src, offsets, out, o2, d1, d2, w, r0, r1, r0, 0, chunked, db, db2,
                    trans, tile, weigh=True)
        else:
            _launch(grid, a, a2, copy, offsets, offsets, out, o2, d1, d2, a, r0, r1, 0, r0, chunked, db, db2,
                    trans, tile)
        del copy


def _row_desc(t, tile, width):
    """A TMA descriptor over t's (rows, width) blocks of BLOCK_K rows, or None where TMA cannot read
    t (a column stride other than 1, rows or base not 16-byte aligned) or the tile does not ask."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    if t.dim() != 2 or t.stride(1) != 1 or t.shape[0] >= 2 ** 31 or not tma_readable(t, t.shape, t.stride()):
        return None
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [tile.block_k, width])


def _out_descs(out, out2, trans, tile):
    """TMA store descriptors over out and out2 (E, M, N) as (E, M, N) blocks (1, BLOCK_M, BLOCK_N),
    or over their transposes where m is the unit-stride dimension (TRANS_OUT); None where the tile
    does not ask or either cannot be written so (the kernel then stores through pointers)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    if not tma_asked(tile, out):
        return None
    block = [1, tile.block_n, tile.block_m] if trans else [1, tile.block_m, tile.block_n]
    descs = []
    for t in (out, out2):
        v = t.transpose(1, 2) if trans else t
        if v.stride(2) != 1 or not tma_readable(v, v.shape, v.stride()):
            return None
        descs.append(TensorDescriptor(v, list(v.shape), list(v.stride()), block))
    return descs


def _descs(a, a2, b, tile):
    """(a's, a2's, b's descriptors) where all of them can be made, else None: the kernel reads
    all its operands one way."""
    if not tma_asked(tile, a):
        return None
    descs = (_row_desc(a, tile, tile.block_m), _row_desc(a2 if a2 is not None else a, tile, tile.block_m),
             _row_desc(b, tile, tile.block_n))
    return None if None in descs else descs


@functools.lru_cache(maxsize=None)
def _sms(device) -> int:
    # the interpreter runs programs one after another: two stand-in SMs make a few programs, each
    # over several tiles, which is what the persistent kernel's bookkeeping must get right
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def bias_grads(a, a2, offsets, db, db2, src, w, off_a, weigh, shape):
    """Bias gradients beside a kernel whose K loop does not sum rows (persistent, row descriptors)."""
    E, M, _ = shape
    for rows, bias, weighed in ((a, db, weigh), (a2, db2, False)):
        if rows is not None and bias is not None:
            block = min(128, next_pow2(M))
            launch(bias_grad_kernel, (E, cdiv(M, block)), rows, rows.stride(0), off_a if rows is a else 0,
                   offsets, bias, *bias.stride(), src, w, M, WEIGH_A=weighed, BLOCK_M=block, BLOCK_K=32)


def _launch(grid, a, a2, b, src, offsets, out, o2, d1, d2, w, r0, r1, off_a, off_b, chunked, db, db2, trans, tile,
            weigh=False):
    a2_or_a = a2 if a2 is not None else a     # the kernels take a pointer either way; DUAL says whether it is read
    if tile.row_descs and not chunked and not (off_a or off_b) and rows_readable(a, a2, b):
        ensure_allocator()
        launch(wgrad_rowdesc_kernel, grid, a, a2_or_a, b, offsets, out, o2, *out.shape[1:], a.stride(0),
               a2_or_a.stride(0), b.stride(0), *out.stride(), *o2.stride(), DUAL=a2 is not None, IEEE=ieee(a),
               TRANS_OUT=trans, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
               num_warps=tile.num_warps, num_stages=tile.num_stages)
        bias_grads(a, a2, offsets, db, db2, src, w, off_a, weigh, out.shape)
        return
    if tile.persistent and not chunked:
        E, M, N = out.shape
        descs = _out_descs(out, o2 if a2 is not None else out, trans, tile)
        launch(wgrad_persistent_kernel, (max(1, min(grid[0], _sms(out.device) * tile.persistent)),),
               a, a2_or_a, b, offsets, out, o2, *(descs or (None, None)), E, M, N, a.stride(0), a2_or_a.stride(0),
               b.stride(0), b.stride(1), *out.stride(), *o2.stride(), off_a, off_b, DUAL=a2 is not None,
               IEEE=ieee(a), TRANS_OUT=trans, TMA_OUT=descs is not None, E_BLOCK=next_pow2(E), BLOCK_M=tile.block_m,
               BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps, num_stages=tile.num_stages)
        bias_grads(a, a2, offsets, db, db2, src, w, off_a, weigh, out.shape)
        return
    descs = _descs(a, a2, b, tile)
    launch(wgrad_kernel, grid,
           a, a2_or_a, b, src, offsets, out, o2, d1, d2, w, *(descs or (None,) * 3), *out.shape,
           a.stride(0), a2_or_a.stride(0), b.stride(0), b.stride(1),
           *out.stride(), *o2.stride(), *d1.stride(), *d2.stride(), r0, r1, off_a, off_b,
           WEIGH_A=weigh, DUAL=a2 is not None, BIAS=db is not None, BIAS2=a2 is not None and db2 is not None,
           IEEE=ieee(a), TRANS_OUT=trans, CHUNKED=chunked, TMA=descs is not None, BLOCK_M=tile.block_m,
           BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps, num_stages=tile.num_stages)
