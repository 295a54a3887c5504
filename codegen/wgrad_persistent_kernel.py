"""Persistent grouped weight gradients: `wgrad_kernel`'s dW[e] = A_e^T B_e over ragged segments, with
a fixed number of programs (Tile.persistent per SM) each walking its share of the (expert, m, n)
tiles in one flat loop over K steps.

Why: at fine-grained widths an expert holds few grouped rows (Qwen3, 4096 tokens: ~256; DeepSeek-V3:
~128), so a tile is two to eight K steps and then a (BLOCK_M, BLOCK_N) store: one program per tile
pays its loads' latency at every start and leaves the SM's load units idle while it stores (Qwen3's
dual kernel ran at 270 TFLOP/s, DeepSeek-V3's at 55% of the gradients' write bandwidth, H100). One
loop over every K step of every tile a program owns lets the software pipeline issue the next
tile's first loads while the current tile's epilogue runs: the epilogue sits inside the loop, under
a branch taken at each tile's last step, as in Triton's persistent matmul before nested loops could
be fused (their fusion needs loop-invariant inner bounds; an expert's row count is not).
Measured (H100, 2026-12-06, 4096 tokens): bit-exact against `wgrad_kernel`; Qwen3's dual kernel
0.766 -> 0.728 ms at two programs an SM; OLMoE's and GPT-OSS's kept the per-tile kernel, whose
blocks, two or more an SM, already overlap one another's stores (the tuner picks per layer).

The number of steps a program runs is counted up front from the offsets in one vector pass over the
experts: tiles t = pid, pid + P, ... of expert e are arithmetic, each takes max(1, cdiv(rows_e, BLOCK_K))
steps (an empty expert's tile takes one fully masked step and writes zeros). With Tile.tma the
tiles are stored through TMA descriptors over the (E, M, N) gradient (or its transpose where m is the
unit-stride dimension): the store is asynchronous, so a tile's write drains under the next tile's
K loop instead of holding the MMAs. Bias gradients come
from `bias_grad_kernel`, launched beside; chunked copies keep `wgrad_kernel` (launch_wgrad decides).
"""
import triton
import triton.language as tl

from .jit_helpers import expert_mn, mma, store_tile


@triton.jit
def _tiles_before(x, pid, nprog):
    """How many of the tiles t = pid, pid + nprog, ... lie below x."""
    return tl.maximum(x - pid + nprog - 1, 0) // nprog


@triton.jit
def _store_desc(desc, e, m0, n0, acc, TRANS_OUT: tl.constexpr):
    """A tile through a TMA store (asynchronous: the next tile's K loop runs while it drains; rows
    and columns past the gradient's edge are clipped by the descriptor's shape)."""
    if TRANS_OUT:
        desc.store([e, n0, m0], tl.trans(acc).to(desc.dtype)[None, :, :])
    else:
        desc.store([e, m0, n0], acc.to(desc.dtype)[None, :, :])


@triton.jit
def wgrad_persistent_kernel(a_ptr, a2_ptr, b_ptr, offsets_ptr, out_ptr, out2_ptr, out_desc, out2_desc, E, M, N,
                            s_a, s_a2, s_b_row, s_b_col, s_o_e, s_o_m, s_o_n, s_o2_e, s_o2_m, s_o2_n, off_a, off_b,
                            DUAL: tl.constexpr, IEEE: tl.constexpr, TRANS_OUT: tl.constexpr, TMA_OUT: tl.constexpr,
                            E_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_e = n_m * n_n
    es = tl.arange(0, E_BLOCK)
    emask = es < E
    rows = tl.load(offsets_ptr + es + 1, mask=emask, other=0) - tl.load(offsets_ptr + es, mask=emask, other=0)
    mine = _tiles_before((es + 1) * per_e, pid, nprog) - _tiles_before(es * per_e, pid, nprog)
    steps = tl.sum(tl.where(emask, mine * tl.maximum(tl.cdiv(rows, BLOCK_K), 1), 0))

    tile = pid - nprog
    ki = -1
    kn = 0
    e = tile * 0
    pid_m, pid_n = e, e
    start = tl.load(offsets_ptr)
    end = start
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(steps):
        ki = tl.where(ki == kn - 1, 0, ki + 1)
        if ki == 0:
            tile += nprog
            e, pid_m, pid_n = expert_mn(tile, M, N, BLOCK_M, BLOCK_N)
            start = tl.load(offsets_ptr + e)
            end = tl.load(offsets_ptr + e + 1)
            kn = tl.maximum(tl.cdiv(end - start, BLOCK_K), 1).to(tl.int32)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = ms < M, ns < N
        s = start + ki * BLOCK_K + tl.arange(0, BLOCK_K)
        smask = s < end
        b = tl.load(b_ptr + (s - off_b)[:, None] * s_b_row + ns[None, :] * s_b_col,
                    mask=smask[:, None] & nmask[None, :], other=0.0)
        a_in = mmask[:, None] & smask[None, :]
        a = tl.load(a_ptr + (s - off_a)[None, :] * s_a + ms[:, None], mask=a_in, other=0.0)     # (BM, BK)
        acc = mma(a, b, acc, IEEE)
        if DUAL:
            a = tl.load(a2_ptr + s[None, :] * s_a2 + ms[:, None], mask=a_in, other=0.0)
            acc2 = mma(a, b, acc2, IEEE)
        if ki == kn - 1:
            if TMA_OUT:
                m0, n0 = (pid_m * BLOCK_M).to(tl.int32), (pid_n * BLOCK_N).to(tl.int32)
                _store_desc(out_desc, e.to(tl.int32), m0, n0, acc, TRANS_OUT)
                if DUAL:
                    _store_desc(out2_desc, e.to(tl.int32), m0, n0, acc2, TRANS_OUT)
            else:
                e64 = e.to(tl.int64)
                ms64, ns64 = ms.to(tl.int64), ns.to(tl.int64)
                store_tile(out_ptr + e64 * s_o_e, s_o_m, s_o_n, ms64, ns64, mmask, mmask, nmask, acc, False,
                           TRANS_OUT)
                if DUAL:
                    store_tile(out2_ptr + e64 * s_o2_e, s_o2_m, s_o2_n, ms64, ns64, mmask, mmask, nmask, acc2,
                               False, TRANS_OUT)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
