"""Plan: group token copies by expert (stable), on the device in two launches, no host sync.

Launch 1 (`plan_count_kernel`), one program per block of copies: per-expert counts of the block
and each copy's rank among the block's copies of its expert (one-hot prefix sums over sub-chunks).
Launch 2 (`plan_scatter_kernel`), same blocks: each program sums the count table (small: at most
~128 blocks x (E+1)) for its experts' start slots, then writes src[slot] = copy, inv[copy] = slot;
program 0 writes offsets. Invalid ids (outside [0, E)) go to segment E, after offsets[E].
Bytes: S ids read twice, 2*S*8 written, + blocks^2 * (E+1) * 4 from L2.
Few copies (decode): one program does both passes (`plan_single_kernel`), recomputing each copy's
rank instead of storing it, so a decode step pays one launch's latency instead of two.
"""
import torch
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import cdiv, next_pow2


@triton.jit
def _expert_key(ids_ptr, c, cmask, E):
    e = tl.load(ids_ptr + c, mask=cmask, other=0).to(tl.int32)
    e = tl.where((e >= 0) & (e < E), e, E)
    return tl.where(cmask, e, -1)


@triton.jit
def plan_count_kernel(ids_ptr, counts_ptr, rank_ptr, S, E, per_block,
                      SUB: tl.constexpr, E_POW2: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.arange(0, E_POW2)
    running = tl.zeros((E_POW2,), dtype=tl.int32)
    end = tl.minimum(b * per_block + per_block, S)
    for c0 in range(b * per_block, end, SUB):
        c = c0 + tl.arange(0, SUB)
        cmask = c < end
        onehot = (_expert_key(ids_ptr, c, cmask, E)[:, None] == cols[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot + running[None, :]
        tl.store(rank_ptr + c, tl.sum(onehot * before, axis=1), mask=cmask)
        running += tl.sum(onehot, axis=0)
    tl.store(counts_ptr + b * E_POW2 + cols, running)


@triton.jit
def plan_scatter_kernel(ids_ptr, counts_ptr, rank_ptr, offsets_ptr, src_ptr, inv_ptr, S, E,
                        per_block, n_blocks, SUB: tl.constexpr, E_POW2: tl.constexpr,
                        ROWS: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.arange(0, E_POW2)
    total = tl.zeros((E_POW2,), dtype=tl.int32)
    earlier = tl.zeros((E_POW2,), dtype=tl.int32)
    for r0 in range(0, n_blocks, ROWS):
        r = r0 + tl.arange(0, ROWS)
        tab = tl.load(counts_ptr + r[:, None] * E_POW2 + cols[None, :], mask=(r < n_blocks)[:, None], other=0)
        total += tl.sum(tab, axis=0)
        earlier += tl.sum(tl.where((r < b)[:, None], tab, 0), axis=0)
    start = tl.cumsum(total, axis=0) - total          # first slot of each segment, E last
    if b == 0:
        tl.store(offsets_ptr + cols, start.to(tl.int64), mask=cols <= E)
    base = start + earlier
    end = tl.minimum(b * per_block + per_block, S)
    for c0 in range(b * per_block, end, SUB):
        c = c0 + tl.arange(0, SUB)
        cmask = c < end
        onehot = _expert_key(ids_ptr, c, cmask, E)[:, None] == cols[None, :]
        slot = tl.sum(tl.where(onehot, base[None, :], 0), axis=1) + tl.load(rank_ptr + c, mask=cmask, other=0)
        tl.store(src_ptr + slot, c.to(tl.int64), mask=cmask)
        tl.store(inv_ptr + c, slot.to(tl.int64), mask=cmask)


@triton.jit
def plan_single_kernel(ids_ptr, offsets_ptr, src_ptr, inv_ptr, S, E, SUB: tl.constexpr, E_POW2: tl.constexpr):
    cols = tl.arange(0, E_POW2)
    total = tl.zeros((E_POW2,), dtype=tl.int32)
    for c0 in range(0, S, SUB):
        c = c0 + tl.arange(0, SUB)
        total += tl.sum((_expert_key(ids_ptr, c, c < S, E)[:, None] == cols[None, :]).to(tl.int32), axis=0)
    start = tl.cumsum(total, axis=0) - total
    tl.store(offsets_ptr + cols, start.to(tl.int64), mask=cols <= E)
    running = start
    for c0 in range(0, S, SUB):
        c = c0 + tl.arange(0, SUB)
        cmask = c < S
        onehot = (_expert_key(ids_ptr, c, cmask, E)[:, None] == cols[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot + running[None, :]
        slot = tl.sum(onehot * before, axis=1)
        tl.store(src_ptr + slot, c.to(tl.int64), mask=cmask)
        tl.store(inv_ptr + c, slot.to(tl.int64), mask=cmask)
        running += tl.sum(onehot, axis=0)


def plan_launch(ids, num_experts, sub=None, max_blocks=128, single_max_chunks=4):
    """-> offsets (E+1,), src (S,), inv (S,) int64, as `reference.plan`."""
    flat = ids.reshape(-1)
    S, E, dev = flat.shape[0], num_experts, ids.device
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    src, inv = torch.empty(S, dtype=torch.int64, device=dev), torch.empty(S, dtype=torch.int64, device=dev)
    if S == 0:
        return offsets, src, inv
    e_pow2 = next_pow2(E + 1)
    sub = sub or max(16, min(128, 8192 // e_pow2))
    if cdiv(S, sub) <= single_max_chunks:
        launch(plan_single_kernel, (1,), flat, offsets, src, inv, S, E, SUB=sub, E_POW2=e_pow2)
        return offsets, src, inv
    per_block = sub * cdiv(cdiv(S, sub), max_blocks)   # <= max_blocks blocks
    n_blocks = cdiv(S, per_block)
    counts = torch.empty(n_blocks, e_pow2, dtype=torch.int32, device=dev)
    rank = torch.empty(S, dtype=torch.int32, device=dev)
    launch(plan_count_kernel, (n_blocks,), flat, counts, rank, S, E, per_block, SUB=sub, E_POW2=e_pow2)
    launch(plan_scatter_kernel, (n_blocks,), flat, counts, rank, offsets, src, inv, S, E, per_block, n_blocks,
           SUB=sub, E_POW2=e_pow2, ROWS=max(1, min(32, 4096 // e_pow2)))
    return offsets, src, inv
