"""Grouped weight gradients with every operand row block through TMA (Tile.row_descs, sm90+):
`wgrad_kernel`'s dW[e] = A_e^T B_e, one program per (expert, m, n) tile, A's and B's descriptors
made on the device per expert with their row count clipped at the expert's last row, so TMA's
zero fill masks the last partial block and the K loop is one uniform pipeline of TMA loads.

Why: `wgrad_kernel` reads whole row blocks through host-made descriptors over all S rows and its
last partial block through masked pointers (the rows past an expert's end are the next expert's,
which a descriptor over every row cannot mask): at ~256 rows an expert (Qwen3, 4096 tokens) that
tail is one step in four or five, with its own loads outside the pipeline. Measured on an H200
(2026-12-06, benchmarks/ws_probe.py, 4096 tokens, a (128, 128, 64) tile of four warps, three
stages): Qwen3's dW 0.338 ms against the tuned `wgrad_kernel`'s 0.397 and torch._grouped_mm's
0.466; OLMoE's 0.322 against 0.358 and 0.402.
Tried beside it: Triton's automatic warp specialization of this loop (`tl.range(...,
warp_specialize=True)`, Triton 3.6 on sm90, one producer and two consumer warp groups): wrong
results at those widths (relative error ~1), though right on a few rows a test makes, so it is
left off (the probe keeps it for a later Triton).
Needs Triton's global scratch (the descriptors are written there): `ensure_allocator`. Bias
gradients come from `bias_grad_kernel`, launched beside; chunked copies keep `wgrad_kernel`.
"""
import triton
import triton.language as tl

from .jit_helpers import expert_mn, mma, store_tile


@triton.jit
def wgrad_rowdesc_kernel(a_ptr, a2_ptr, b_ptr, offsets_ptr, out_ptr, out2_ptr, M, N, s_a, s_a2, s_b,
                         s_o_e, s_o_m, s_o_n, s_o2_e, s_o2_m, s_o2_n,
                         DUAL: tl.constexpr, IEEE: tl.constexpr, TRANS_OUT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e, pid_m, pid_n = expert_mn(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    lo = tl.load(offsets_ptr + e).to(tl.int32)
    hi = tl.load(offsets_ptr + e + 1).to(tl.int32)
    rows = tl.maximum(hi, 1)        # an empty expert at row 0 reads nothing, but a descriptor needs a row
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[rows, M], strides=[s_a, 1], block_shape=[BLOCK_K, BLOCK_M])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[rows, N], strides=[s_b, 1], block_shape=[BLOCK_K, BLOCK_N])
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DUAL:
        a2_desc = tl.make_tensor_descriptor(a2_ptr, shape=[rows, M], strides=[s_a2, 1],
                                            block_shape=[BLOCK_K, BLOCK_M])
        for r in range(lo, hi, BLOCK_K):
            b = b_desc.load([r, n0])
            acc = mma(tl.trans(a_desc.load([r, m0])), b, acc, IEEE)
            acc2 = mma(tl.trans(a2_desc.load([r, m0])), b, acc2, IEEE)
    else:
        for r in range(lo, hi, BLOCK_K):
            acc = mma(tl.trans(a_desc.load([r, m0])), b_desc.load([r, n0]), acc, IEEE)
    ms = m0 + tl.arange(0, BLOCK_M)
    ns = n0 + tl.arange(0, BLOCK_N)
    mmask, nmask = ms < M, ns < N
    e64 = e.to(tl.int64)
    ms64, ns64 = ms.to(tl.int64), ns.to(tl.int64)
    store_tile(out_ptr + e64 * s_o_e, s_o_m, s_o_n, ms64, ns64, mmask, mmask, nmask, acc, False, TRANS_OUT)
    if DUAL:
        store_tile(out2_ptr + e64 * s_o2_e, s_o2_m, s_o2_n, ms64, ns64, mmask, mmask, nmask, acc2, False, TRANS_OUT)
