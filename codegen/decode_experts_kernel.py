"""The experts and the combine of a decode-size inference forward in two launches instead of three:
one GEMV kernel streams each routed copy's gate/up rows and down columns for a block of F, the
activation between them in registers, and a deterministic reduction sums the partials per token.

Why: at one token every expert GEMM is a GEMV, bounded by how fast its weights stream. The grouped
GEMMs (gate_up_kernel, down_kernel) each pay a ramp and a tail, and the down projection cannot
start before the last gate/up tile is stored (Qwen3, one token, H100, 2026-12-05: gate_up 22.9 us,
down 12.8, combine 2.9 against a 25 us floor for all three, benchmarks/results/stop26_h100). Here
one grid streams all three matrices: program (s, f) reads W_gate[e] and W_up[e] rows f*ROWS_F..
(ROWS_F x H), forms h for those F columns, then W_down[e][:, that block] (H x ROWS_F), and
writes its partial y (H,) in float32. No program waits on another, and h never leaves registers.

    partial[f, s] = W_down[e][:, f block] act(x[t] W_gate[e][f block]^T, x[t] W_up[e][f block]^T)
                    (+ b_down[e] in block 0),  s a grouped copy of token t on expert e
    out[t] = sum_j route_w[t, j] sum_f partial[f, inv[t k + j]]       (fixed order: deterministic)

h is rounded to x's dtype before the down projection, as the grouped path stores it, so both paths
give the same numbers up to summation order. Dropped copies (past offsets[E]) are skipped and
count zero. Bytes: the touched experts' weights once + (F / BLOCK_F) * S * H float32 partials,
written and read (1.5 MB at one Qwen3 token, against 75 MB of weights). Each program re-reads its
expert's weights, so batches whose copies share experts take the grouped GEMMs (decode_fused.py).
"""
import torch
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import activate, cdiv, ieee, mma, next_pow2, pdl_enter, pdl_release, pdl_wait
from .pdl import launch_kwargs


@triton.jit
def decode_experts_kernel(x_ptr, src_ptr, offsets_ptr, wu_ptr, wg_ptr, wd_ptr, bu_ptr, bg_ptr, bd_ptr, part_ptr,
                          S, E, H, F, ROWS_F, k_top, alpha, limit, s_xt,
                          s_wu_e, s_wu_f, s_wu_h, s_wg_e, s_wg_f, s_wg_h, s_wd_e, s_wd_h, s_wd_f,
                          s_bu_e, s_bu_f, s_bg_e, s_bg_f, s_bd_e, s_bd_h,
                          ACT: tl.constexpr, GATED: tl.constexpr, HAS_BU: tl.constexpr, HAS_BG: tl.constexpr,
                          HAS_BD: tl.constexpr, IEEE: tl.constexpr, E_POW2: tl.constexpr, BLOCK_F: tl.constexpr,
                          BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    s = tl.program_id(0)
    fb = tl.program_id(1)
    if s >= tl.load(offsets_ptr + E):      # a dropped copy: the reduction counts it zero
        pdl_release(PDL)
        return
    es = tl.arange(0, E_POW2)
    ends = tl.load(offsets_ptr + 1 + es, mask=es < E, other=S + 1)
    e64 = tl.sum((ends <= s).to(tl.int32)).to(tl.int64)     # the segment holding copy s
    tok = (tl.load(src_ptr + s) // k_top).to(tl.int64)
    offs = tl.arange(0, BLOCK_F)
    fs = fb * ROWS_F + offs         # ROWS_F <= BLOCK_F rows of F a program (decode_fused.settings)
    fmask = (offs < ROWS_F) & (fs < F)
    # The token is row 0 of a 16-row MMA tile whose other rows are zero: the products cost nothing
    # here (the weights' bytes bound the kernel), and loads that feed a dot are the ones Triton
    # pipelines (cp.async stages); elementwise GEMV products streamed at ~half the rate (stop 34).
    rows = tl.arange(0, 16)
    first = rows == 0
    acc_u = tl.zeros((16, BLOCK_F), dtype=tl.float32)
    acc_g = tl.zeros((16, BLOCK_F), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        xa = tl.load(x_ptr + tok * s_xt + rows[:, None] * 0 + hs[None, :], mask=first[:, None] & hmask[None, :],
                     other=0.0)
        wmask = hmask[:, None] & fmask[None, :]
        wu = tl.load(wu_ptr + e64 * s_wu_e + hs[:, None] * s_wu_h + fs[None, :] * s_wu_f, mask=wmask, other=0.0)
        acc_u = mma(xa, wu, acc_u, IEEE)
        if GATED:
            wg = tl.load(wg_ptr + e64 * s_wg_e + hs[:, None] * s_wg_h + fs[None, :] * s_wg_f, mask=wmask,
                         other=0.0)
            acc_g = mma(xa, wg, acc_g, IEEE)
    if HAS_BU:
        acc_u += tl.load(bu_ptr + e64 * s_bu_e + fs * s_bu_f, mask=fmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BG:
        acc_g += tl.load(bg_ptr + e64 * s_bg_e + fs * s_bg_f, mask=fmask, other=0.0).to(tl.float32)[None, :]
    h = activate(acc_g, acc_u, alpha, limit, ACT, GATED)
    h = tl.where(first[:, None] & fmask[None, :], h, 0.0).to(x_ptr.dtype.element_ty)
    row = part_ptr + (fb.to(tl.int64) * S + s) * H
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        wd = tl.load(wd_ptr + e64 * s_wd_e + fs[:, None] * s_wd_f + hs[None, :] * s_wd_h,
                     mask=fmask[:, None] & hmask[None, :], other=0.0)
        y = tl.sum(mma(h, wd, tl.zeros((16, BLOCK_H), dtype=tl.float32), IEEE), axis=0)    # row 0's
        if HAS_BD:
            first_block = hs < tl.where(fb == 0, H, 0)      # block 0 alone adds the bias
            y += tl.load(bd_ptr + e64 * s_bd_e + hs * s_bd_h, mask=first_block, other=0.0).to(tl.float32)
        tl.store(row + hs, y, mask=hmask)
    pdl_release(PDL)


@triton.jit
def decode_reduce_kernel(part_ptr, inv_ptr, w_ptr, offsets_ptr, out_ptr, S, E, H, NB, s_out, K: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    """out[t, h block] = sum over the token's K * NB partial rows, BLOCK_R rows a load: at one token
    that is one load's latency, where a loop over the K copies paid K (6.3 us against the grouped
    path's 2.9-us combine, Qwen3, H100, stop 34)."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hs < H
    kept = tl.load(offsets_ptr + E)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for r0 in range(0, K * NB, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)         # row r: copy j = r // NB, F block r % NB
        rmask = rs < K * NB
        j = rs // NB
        slot = tl.load(inv_ptr + t * K + j, mask=rmask, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * K + j, mask=rmask, other=0.0).to(tl.float32)
        live = rmask & (slot < kept)            # a dropped copy has no partials
        p = tl.load(part_ptr + ((rs % NB).to(tl.int64) * S + slot)[:, None] * H + hs[None, :],
                    mask=live[:, None] & hmask[None, :], other=0.0)
        acc += tl.sum(p * w[:, None], axis=0)
    tl.store(out_ptr + t.to(tl.int64) * s_out + hs, acc.to(out_ptr.dtype.element_ty), mask=hmask)


def decode_experts_launch(x, src, offsets, inv, route_w, k, roles, act_code, alpha, limit, out, settings,
                          pdl=False):
    """out (T, H) = the combined experts' output, as experts_forward then combine_launch give it.
    roles: layout.views' (w_up, w_gate, w_down, b_up, b_gate, b_down), no LoRA. settings:
    decode_fused.settings' (block_f, rows_f, block_h, num_warps, num_stages)."""
    w_up, w_gate, w_down, b_up, b_gate, b_down = roles
    S, (E, F, H) = src.shape[0], w_up.shape
    T = out.shape[0]
    block_f, rows_f, block_h, warps, stages = settings
    nb = cdiv(F, rows_f)
    part = x.new_empty(nb, S, H, dtype=torch.float32)
    wg = w_gate if w_gate is not None else w_up
    zero2 = (0, 0)
    launch(decode_experts_kernel, (S, nb),
           x, src, offsets, w_up, w_gate, w_down, b_up, b_gate, b_down, part, S, E, H, F, rows_f, k, alpha, limit,
           x.stride(0), *w_up.stride(), *wg.stride(), *w_down.stride(),
           *(b_up.stride() if b_up is not None else zero2), *(b_gate.stride() if b_gate is not None else zero2),
           *(b_down.stride() if b_down is not None else zero2),
           ACT=act_code, GATED=w_gate is not None, HAS_BU=b_up is not None, HAS_BG=b_gate is not None,
           HAS_BD=b_down is not None, IEEE=ieee(x), E_POW2=max(2, next_pow2(E)), BLOCK_F=block_f, BLOCK_H=block_h,
           num_warps=warps, num_stages=stages,
           **launch_kwargs(pdl))
    rh = min(32, next_pow2(H))
    launch(decode_reduce_kernel, (T, cdiv(H, rh)),
           part, inv, route_w.contiguous(), offsets, out, S, E, H, nb, out.stride(0), K=k,
           BLOCK_R=min(256, next_pow2(k * nb)), BLOCK_H=rh, num_warps=4, **launch_kwargs(pdl))
    return out
