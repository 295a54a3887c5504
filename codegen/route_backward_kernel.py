"""Router gradient: d loss / d logits (T, E) from d loss / d weights (T, k) for fixed ids.

Same formulas as `reference.route_weights_backward`, one program per block of tokens, whole
expert rows in registers. Bytes: T*E read + T*E written + T*k*(4+8) read.
"""
import torch
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import _sigmoid, cdiv, next_pow2
from .route_kernel import _SCORING, _gather


@triton.jit
def _scatter(vals, ids, cols, BLOCK_T: tl.constexpr, E_POW2: tl.constexpr, K_POW2: tl.constexpr):
    """(BT, K_POW2) values placed at columns ids -> (BT, E_POW2), zeros elsewhere."""
    out = tl.zeros((BLOCK_T, E_POW2), dtype=tl.float32)
    kcol = tl.arange(0, K_POW2)
    for j in tl.static_range(K_POW2):
        idj = tl.sum(tl.where(kcol[None, :] == j, ids, 0), axis=1)
        vj = tl.sum(tl.where(kcol[None, :] == j, vals, 0.0), axis=1)
        out = tl.where(cols[None, :] == idj[:, None], vj[:, None], out)
    return out


@triton.jit
def route_backward_kernel(gw_ptr, logits_ptr, ids_ptr, out_ptr, T, E, s_l, scale,
                          K: tl.constexpr, SCORING: tl.constexpr, RENORM: tl.constexpr,
                          BLOCK_T: tl.constexpr, E_POW2: tl.constexpr, K_POW2: tl.constexpr):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_POW2)
    kcol = tl.arange(0, K_POW2)
    tmask = ts < T
    mask = tmask[:, None] & (cols < E)[None, :]
    kmask = tmask[:, None] & (kcol < K)[None, :]
    rows64 = ts[:, None].to(tl.int64)
    logit = tl.load(logits_ptr + rows64 * s_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    logit = tl.where((cols < E)[None, :], logit, float("-inf"))    # padding tokens stay finite
    ids = tl.load(ids_ptr + rows64 * K + kcol[None, :], mask=kmask, other=-1).to(tl.int32)
    g = tl.load(gw_ptr + rows64 * K + kcol[None, :], mask=kmask, other=0.0).to(tl.float32) * scale
    if SCORING == 1:
        v = tl.where((kcol < K)[None, :], _gather(logit, cols, ids, BLOCK_T, K_POW2), float("-inf"))
        z = tl.exp(v - tl.max(v, axis=1)[:, None])
        w = z / tl.sum(z, axis=1)[:, None]
        dlogit = _scatter(w * (g - tl.sum(g * w, axis=1)[:, None]), ids, cols, BLOCK_T, E_POW2, K_POW2)
    else:
        if SCORING == 0:
            z = tl.exp(logit - tl.max(logit, axis=1)[:, None])
            p = z / tl.sum(z, axis=1)[:, None]
        else:
            p = tl.where(mask, _sigmoid(logit), 0.0)
        if RENORM:
            sel = tl.where(kmask, _gather(p, cols, ids, BLOCK_T, K_POW2), 0.0)
            denom = tl.sum(sel, axis=1)[:, None] + (1e-20 if SCORING == 2 else 0.0)
            denom = tl.where(tmask[:, None], denom, 1.0)      # padding tokens: keep finite
            g = (g - tl.sum(g * sel / denom, axis=1)[:, None]) / denom
        dp = _scatter(g, ids, cols, BLOCK_T, E_POW2, K_POW2)
        if SCORING == 0:
            dlogit = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        else:
            dlogit = dp * p * (1.0 - p)
    tl.store(out_ptr + rows64 * E + cols[None, :], dlogit.to(out_ptr.dtype.element_ty), mask=mask)


def route_backward_launch(grad_w, logits, ids, scoring, renormalize, scale):
    T, E = logits.shape
    k = ids.shape[1]
    out = torch.empty(T, E, dtype=logits.dtype, device=logits.device)
    if T == 0:
        return out
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    e_pow2 = next_pow2(E)
    block_t = max(1, min(32, 2048 // e_pow2))
    launch(route_backward_kernel, (cdiv(T, block_t),),
        grad_w.contiguous(), logits, ids.contiguous(), out, T, E, logits.stride(0), scale,
        K=k, SCORING=_SCORING[scoring], RENORM=renormalize, BLOCK_T=block_t, E_POW2=e_pow2,
        K_POW2=next_pow2(k), num_warps=4)
    return out
