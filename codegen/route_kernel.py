"""Router: scores -> top-k experts and their weights, one program per block of tokens.

scoring 0 softmax (top-k on the probabilities), 1 softmax_after_topk (top-k on the logits, softmax
over the k chosen), 2 sigmoid (+ score bias for the choice only; DeepSeek-V3 groups: keep the
`topk_group` groups whose two best scores sum highest; the others' experts unavailable, or, with
FILL, scored `fill` as transformers' 0.0 does). Then renormalize, scale. Selection is k
rounds of argmax, ties to the lower expert index, which gives torch.topk's set and order on
distinct scores. Bytes: T*E read, T*k*(4+8) written.
"""
import triton
import triton.language as tl

from .fast_launch import launch
from .jit_helpers import _sigmoid, cdiv, next_pow2


@triton.jit
def _argmax_rounds(score, value, avail, cols, K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """k rounds of (max, lowest index among equals) -> ids (BT, K_POW2) int32 and `value` at each
    pick (BT, K_POW2) fp32, read in the same round (a separate gather would be two more
    reductions per slot on a launch whose latency is the decode step's)."""
    kcol = tl.arange(0, K_POW2)
    ids = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int32)
    picked = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    for j in range(K):
        best = tl.max(tl.where(avail, score, float("-inf")), axis=1)
        pick = tl.min(tl.where(avail & (score == best[:, None]), cols[None, :], E_POW2), axis=1)
        v = tl.sum(tl.where(cols[None, :] == pick[:, None], value, 0.0), axis=1)
        ids = tl.where(kcol[None, :] == j, pick[:, None], ids)
        picked = tl.where(kcol[None, :] == j, v[:, None], picked)
        avail = avail & (cols[None, :] != pick[:, None])
    return ids, picked


@triton.jit
def _sort_select(choice, avail, cols, K_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr):
    """_argmax_rounds' picks by one bitonic sort of (score, index) keys instead of k dependent rounds
    of three reductions each (a decode step's routing waits on their latency): -> ids (BT, K_POW2)
    int32, the K_POW2 best in order, ties to the lower index, and their scores (BT, K_POW2) fp32."""
    i = tl.where(avail, choice, float("-inf")).to(tl.int32, bitcast=True)
    i = i ^ ((i >> 31) & 0x7FFFFFFF)        # float order as int32 order (an involution; signed ops only)
    key = (i.to(tl.int64) << 32) | (E_POW2 - 1 - cols)[None, :].to(tl.int64)
    top = tl.reshape(tl.sort(key, dim=1, descending=True), (BLOCK_T, E_POW2 // K_POW2, K_POW2))
    first = tl.sum(tl.where(tl.arange(0, E_POW2 // K_POW2)[None, :, None] == 0, top, 0), axis=1)
    ids = (E_POW2 - 1 - (first & 0xFFFFFFFF)).to(tl.int32)
    hi = (first >> 32).to(tl.int32)
    score = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return ids, score


@triton.jit
def _gather(tile, cols, ids, BLOCK_T: tl.constexpr, K_POW2: tl.constexpr):
    """tile[t, ids[t, j]] for each j -> (BT, K_POW2); one-hot sums, as Triton has no row gather."""
    kcol = tl.arange(0, K_POW2)
    out = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    for j in tl.static_range(K_POW2):
        idj = tl.sum(tl.where(kcol[None, :] == j, ids, 0), axis=1)
        v = tl.sum(tl.where(cols[None, :] == idj[:, None], tile, 0.0), axis=1)
        out = tl.where(kcol[None, :] == j, v[:, None], out)
    return out


@triton.jit
def route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, s_l, scale, topk_group, fill,
                 K: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr,
                 RENORM: tl.constexpr, N_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr, FILL: tl.constexpr,
                 BLOCK_T: tl.constexpr, E_POW2: tl.constexpr, K_POW2: tl.constexpr, SORT: tl.constexpr = False):
    route_tokens(tl.program_id(0), logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, s_l, scale, topk_group, fill, K,
                 SCORING, HAS_BIAS, RENORM, N_GROUP, GROUP_TOP2, FILL, BLOCK_T, E_POW2, K_POW2, SORT)


@triton.jit
def route_tokens(tb, logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, s_l, scale, topk_group, fill,
                 K: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr,
                 RENORM: tl.constexpr, N_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr, FILL: tl.constexpr,
                 BLOCK_T: tl.constexpr, E_POW2: tl.constexpr, K_POW2: tl.constexpr, SORT: tl.constexpr):
    """route_kernel's body for token block tb (other kernels route inside one of their programs)."""
    ts = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_POW2)
    tmask, emask = ts < T, cols < E
    mask = tmask[:, None] & emask[None, :]
    logit = tl.load(logits_ptr + ts[:, None].to(tl.int64) * s_l + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
    avail = (cols < E)[None, :] & (ts == ts)[:, None]      # padding tokens still see finite rows
    if SCORING == 0:
        z = tl.exp(tl.where(avail, logit, float("-inf")) - tl.max(tl.where(avail, logit, float("-inf")), axis=1)[:, None])
        prob = z / tl.sum(z, axis=1)[:, None]
        choice = prob
    elif SCORING == 1:
        prob = logit
        choice = logit
    else:
        prob = _sigmoid(logit)
        choice = prob
        if HAS_BIAS:
            choice += tl.load(bias_ptr + cols, mask=emask, other=0.0).to(tl.float32)[None, :]
        if N_GROUP > 1:
            kept = _keep_top_groups(choice, avail, cols, E // N_GROUP, topk_group, N_GROUP, GROUP_TOP2,
                                    BLOCK_T, E_POW2)
            if FILL:
                choice = tl.where(kept, choice, fill)
            else:
                avail = avail & kept
    if SORT:
        ids, w = _sort_select(choice, avail, cols, K_POW2, E_POW2, BLOCK_T)
        if SCORING == 2:        # the choice had a bias or a fill in it: the weight is the sigmoid's
            w = _sigmoid(tl.load(logits_ptr + ts[:, None].to(tl.int64) * s_l + ids, mask=tmask[:, None],
                                 other=0.0).to(tl.float32))
    else:
        ids, w = _argmax_rounds(choice, prob, avail, cols, K, K_POW2, E_POW2, BLOCK_T)
    kmask = tl.arange(0, K_POW2)[None, :] < K
    if SCORING == 1:
        z = tl.where(kmask, tl.exp(w - tl.max(tl.where(kmask, w, float("-inf")), axis=1)[:, None]), 0.0)
        w = z / tl.sum(z, axis=1)[:, None]
    w = tl.where(kmask, w, 0.0)
    if RENORM:
        eps = 1e-20 if SCORING == 2 else 0.0
        w = w / (tl.sum(w, axis=1)[:, None] + eps)
    out = ts[:, None].to(tl.int64) * K + tl.arange(0, K_POW2)[None, :]
    omask = tmask[:, None] & kmask
    tl.store(w_ptr + out, w * scale, mask=omask)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=omask)


@triton.jit
def _keep_top_groups(choice, avail, cols, group_size, topk_group, N_GROUP: tl.constexpr,
                     GROUP_TOP2: tl.constexpr, BLOCK_T: tl.constexpr, E_POW2: tl.constexpr):
    """DeepSeek-V3: group score = sum of its two best (one if groups are singletons); experts
    -> (BT, E_POW2) mask of the experts inside the best topk_group groups."""
    gcol = tl.arange(0, N_GROUP)
    gscore = tl.zeros((BLOCK_T, N_GROUP), dtype=tl.float32)
    member = cols[None, :] // group_size
    for g in tl.static_range(N_GROUP):
        inside = avail & (member == g)
        v = tl.where(inside, choice, float("-inf"))
        top = tl.max(v, axis=1)
        s = top
        if GROUP_TOP2:
            first = tl.min(tl.where(inside & (v == top[:, None]), cols[None, :], E_POW2), axis=1)
            s += tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), v), axis=1)
        gscore = tl.where(gcol[None, :] == g, s[:, None], gscore)
    gavail = gscore == gscore    # all true
    keep = tl.zeros((BLOCK_T, N_GROUP), dtype=tl.int32)
    for j in range(topk_group):
        best = tl.max(tl.where(gavail, gscore, float("-inf")), axis=1)
        pick = tl.min(tl.where(gavail & (gscore == best[:, None]), gcol[None, :], N_GROUP), axis=1)
        keep = tl.where(gcol[None, :] == pick[:, None], 1, keep)
        gavail = gavail & (gcol[None, :] != pick[:, None])
    kept = tl.zeros((BLOCK_T, E_POW2), dtype=tl.int32)
    for g in tl.static_range(N_GROUP):
        kg = tl.sum(tl.where(gcol[None, :] == g, keep, 0), axis=1)
        kept = tl.where(member == g, kg[:, None], kept)
    return kept > 0


_SCORING = {"softmax": 0, "softmax_after_topk": 1, "sigmoid": 2}


def route_settings(E, k, scoring, renormalize, has_bias, n_group, group_fill, sort=False):
    """route_kernel's compile-time settings, for its launchers here and in route_plan_kernel.py.
    sort: pick the top k by one sort (_sort_select) instead of k argmax rounds."""
    groups = n_group if scoring == "sigmoid" and n_group > 1 else 1
    return dict(K=k, SCORING=_SCORING[scoring], HAS_BIAS=has_bias, RENORM=renormalize, N_GROUP=groups,
                GROUP_TOP2=E // groups >= 2, FILL=group_fill is not None, E_POW2=next_pow2(E), K_POW2=next_pow2(k),
                SORT=sort)


def route_launch(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, group_fill=None):
    import torch
    T, E = logits.shape
    w = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return w, ids
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    e_pow2 = next_pow2(E)
    # few tokens (decode): a tile of just those rows and fewer warps, whose reductions then stay
    # within a warp; the launch's latency is what a decode step pays (12 us at T=1, E=128 before).
    # The tile is a power-of-two bucket of T: at most 7 compiled variants, each built once
    block_t = max(1, min(64, 4096 // e_pow2, next_pow2(T)))
    warps = max(1, min(4, block_t * e_pow2 // 256))
    launch(route_kernel, (cdiv(T, block_t),),
        logits, bias, w, ids, T, E, logits.stride(0), scale,
        topk_group, 0.0 if group_fill is None else group_fill, BLOCK_T=block_t, num_warps=warps,
        **route_settings(E, k, scoring, renormalize, bias is not None, n_group, group_fill))
    return w, ids
