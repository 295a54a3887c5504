"""Plain-PyTorch definitions of moec's ops: the semantics every kernel must reproduce.

Legend: T tokens, H hidden, E experts, k top-k, F expert width, S = T*k token copies.
Layout words (ScatterMoE): "scattered" = token order (copy c = t*k + j), "grouped" = expert
order (slot s). `src[s]` is the copy in slot s (y_grouped = y_scattered[src]); `inv[c]` the slot
of copy c.
"""
import torch
import torch.nn.functional as F

from . import layout as layouts


def _acc(t):
    """The accumulation dtype: float32, or float64 for float64 inputs (float64 models keep it)."""
    return t if t.dtype == torch.float64 else t.float()


def route(logits_TE, bias_E, k, scoring, renormalize, scale, n_group, topk_group, group_fill=None):
    """Router scores -> (weights (T, k) float32 (float64 for float64 logits), ids (T, k) int64). Differentiable in logits.
    group_fill: see `_keep_top_groups`."""
    ids = torch.topk(route_choice(logits_TE, bias_E, scoring, n_group, topk_group, group_fill), k, dim=-1)[1]
    return route_weights(logits_TE, ids, scoring, renormalize, scale), ids


def route_choice(logits_TE, bias_E, scoring, n_group=1, topk_group=1, group_fill=None):
    """The (T, E) scores whose top-k are the chosen experts."""
    if scoring == "softmax":
        return torch.softmax(_acc(logits_TE), dim=-1)
    if scoring == "softmax_after_topk":
        return logits_TE
    if scoring != "sigmoid":
        raise ValueError(f"unknown scoring {scoring!r}")
    choice = torch.sigmoid(_acc(logits_TE))
    choice = choice if bias_E is None else choice + _acc(bias_E)
    return _keep_top_groups(choice, n_group, topk_group, group_fill) if n_group > 1 else choice


def route_weights(logits_TE, ids_Tk, scoring, renormalize, scale):
    """The routing weights of the chosen experts: the differentiable half of `route`."""
    if scoring == "softmax":
        weights = torch.softmax(_acc(logits_TE), dim=-1).gather(1, ids_Tk)
    elif scoring == "softmax_after_topk":
        weights = torch.softmax(_acc(logits_TE.gather(1, ids_Tk)), dim=-1)
    else:
        weights = torch.sigmoid(_acc(logits_TE)).gather(1, ids_Tk)
    if renormalize:
        eps = 1e-20 if scoring == "sigmoid" else 0.0
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights * scale


def route_weights_backward(grad_w_Tk, logits_TE, ids_Tk, scoring, renormalize, scale):
    """d(loss)/d(logits) given d(loss)/d(weights), for fixed ids. Explicit formulas, because op
    bodies run below autograd. Computed in float32, returned in the logits' dtype."""
    g = _acc(grad_w_Tk) * scale
    if scoring == "softmax_after_topk":
        v = _acc(logits_TE.gather(1, ids_Tk))
        w = torch.softmax(v, dim=-1)
        # softmax over the k values already sums to one: renormalising changes nothing.
        dv = w * (g - (g * w).sum(-1, keepdim=True))
        return torch.zeros_like(_acc(logits_TE)).scatter_(1, ids_Tk, dv).to(logits_TE.dtype)
    probs = torch.softmax(_acc(logits_TE), -1) if scoring == "softmax" else torch.sigmoid(_acc(logits_TE))
    sel = probs.gather(1, ids_Tk)
    if renormalize:
        denom = sel.sum(-1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0.0)
        g = (g - (g * sel / denom).sum(-1, keepdim=True)) / denom
    dp = torch.zeros_like(probs).scatter_(1, ids_Tk, g)
    if scoring == "softmax":
        dlogits = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    else:
        dlogits = dp * probs * (1 - probs)
    return dlogits.to(logits_TE.dtype)


def _keep_top_groups(choice_TE, n_group, topk_group, group_fill=None):
    """DeepSeek-V3 grouped selection: experts outside the best `topk_group` groups get -inf
    (group_fill None: DeepSeek's and vLLM's code), or the score `group_fill` (transformers' 0.0,
    which a kept expert whose biased score is negative ranks below)."""
    T, E = choice_TE.shape
    grouped = choice_TE.view(T, n_group, E // n_group)
    group_scores = grouped.topk(min(2, E // n_group), dim=-1)[0].sum(dim=-1)     # (T, G)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1.0)
    mask = keep.bool().unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    return choice_TE.masked_fill(~mask, float("-inf") if group_fill is None else group_fill)


def plan(ids_Tk, num_experts):
    """Group token copies by expert (stable). Ids outside [0, E) are dropped copies: they sort to
    the end, past offsets[E]. Returns offsets (E+1,), src (S,), inv (S,), all int64."""
    flat = ids_Tk.reshape(-1)
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    src = torch.sort(key, stable=True)[1]                                          # (S,)
    inv = torch.empty_like(src)
    inv[src] = torch.arange(src.numel(), device=src.device)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, src, inv


def activate(g, u, activation, alpha, limit):
    """h = act(g) * u for gated experts (g given), act(u) otherwise."""
    if activation == "swiglu_oai":
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    act = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
           "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[activation]
    return act(u) if g is None else act(g) * u


def activate_backward(g, u, grad_h, activation, alpha, limit):
    """(d g, d u) of `activate` given d h; d g is None for non-gated experts."""
    if activation == "swiglu_oai":
        gc, uc = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
        sig = torch.sigmoid(gc * alpha)
        glu = gc * sig
        du = grad_h * glu * ((u >= -limit) & (u <= limit))
        dg = grad_h * (uc + 1) * (sig + gc * alpha * sig * (1 - sig)) * (g <= limit)
        return dg, du
    v = u if g is None else g
    a, da = _act_and_derivative(v, activation)
    if g is None:
        return None, grad_h * da
    return grad_h * u * da, grad_h * a


def _act_and_derivative(v, activation):
    if activation == "silu":
        sig = torch.sigmoid(v)
        return v * sig, sig * (1 + v * (1 - sig))
    if activation == "relu":
        return F.relu(v), (v > 0).to(v.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(v * 0.7071067811865476))
        pdf = torch.exp(-0.5 * v * v) * 0.3989422804014327
        return v * cdf, cdf + v * pdf
    c = 0.7978845608028654  # gelu_tanh: sqrt(2 / pi)
    t = torch.tanh(c * (v + 0.044715 * v ** 3))
    return 0.5 * v * (1 + t), 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * 0.044715 * v * v)


def experts(x_TH, src_S, offsets, k, weights, layout, activation, alpha, limit, pre=None):
    """Expert MLPs over grouped token copies -> y (S, H); rows past offsets[E] are zero.

    `layout` (codegen/layout.py) reads w_up, w_gate: (E, F, H); w_down: (E, H, F), the biases and
    any LoRA factors out of the base tensors `weights`; per projection p,
    p(v) = v W_p^T + b_p + s_p (v A_p^T) B_p^T, and y_e = down(act(gate(x), up(x))).
    Loops over experts on the host: a reference, not a kernel. `pre` (S, 2F or F), where given,
    gets the pre-activations u | g of each grouped row.
    """
    w_up, w_gate, w_down, b_up, b_gate, b_down = layouts.views(weights, layout)
    l_up, l_gate, l_down = layouts.lora(weights, layout)
    S, H = src_S.shape[0], w_down.shape[1]
    y = x_TH.new_zeros(S, H)
    bounds = offsets.tolist()
    for e in range(w_up.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        rows = x_TH[src_S[lo:hi] // k]
        u = _project(rows, e, w_up, b_up, l_up)
        g = None if w_gate is None else _project(rows, e, w_gate, b_gate, l_gate)
        y[lo:hi] = _project(activate(g, u, activation, alpha, limit), e, w_down, b_down, l_down)
        if pre is not None:
            pre[lo:hi] = u if g is None else torch.cat([u, g], dim=1)
    return y


def experts_backward(grad_y_SH, x_TH, src_S, offsets, k, weights, layout, activation, alpha, limit,
                     needs=None, keep=None):
    """[dx, one gradient per base of `weights`]: each role's gradient added into its view of its
    base's (zeroed) gradient, as autograd through the views would. needs[i] False: base i gets
    None, and no role reading it has its gradient computed (frozen base weights under LoRA).
    keep: as `_backward`'s."""
    parsed = layouts.parse(layout)
    needs = [True] * len(weights) if needs is None else list(needs)
    grads = [torch.zeros_like(w) if need else None for w, need in zip(weights, needs)]
    slots = {role: layouts.view(grads[v.index], v) for role, v in parsed.items() if needs[v.index]}
    per_role = {role: torch.zeros_like(slot) for role, slot in slots.items()}
    dx = _backward(grad_y_SH, x_TH, src_S, offsets, k, layouts.views(weights, layout),
                   layouts.lora(weights, layout), per_role, activation, alpha, limit, keep)
    for role, g in per_role.items():
        slots[role].add_(g)
    return [dx] + grads


def experts_backward_rows(grad_y_SH, x_TH, src_S, offsets, k, weights, layout, activation, alpha, limit):
    """[dx, h, du, dg] of `experts_backward` without its weight gradients: h the activation's
    output, du / dg the gradients of up's / gate's outputs (S, F) grouped, zero past offsets[E];
    dg (0,) without a gate. No LoRA layouts."""
    roles = layouts.views(weights, layout)
    S, F = src_S.shape[0], roles[0].shape[1]
    keep = {"h": x_TH.new_zeros(S, F), "du": x_TH.new_zeros(S, F),
            "dg": x_TH.new_zeros(S, F) if roles[1] is not None else x_TH.new_empty(0)}
    dx = _backward(grad_y_SH, x_TH, src_S, offsets, k, roles, (None, None, None), {}, activation, alpha, limit,
                   keep)
    return [dx, keep["h"], keep["du"], keep["dg"]]


def experts_wgrad(grad_y_SH, x_TH, src_S, offsets, k, h_SF, du_SF, dg_SF, weights, layout, needs=None):
    """The weight gradients of `experts_backward` from `experts_backward_rows`' h, du, dg: one per
    base of `weights` (None where needs[i] is False)."""
    parsed = layouts.parse(layout)
    needs = [True] * len(weights) if needs is None else list(needs)
    grads = [torch.zeros_like(w) if need else None for w, need in zip(weights, needs)]
    slots = {role: layouts.view(grads[v.index], v) for role, v in parsed.items() if needs[v.index]}
    per_role = {role: torch.zeros_like(slot) for role, slot in slots.items()}
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        rows = x_TH[src_S[lo:hi] // k]
        for p, d_out, v in (("down", grad_y_SH[lo:hi], h_SF[lo:hi]), ("up", du_SF[lo:hi], rows),
                            ("gate", dg_SF[lo:hi] if dg_SF.numel() else None, rows)):
            if d_out is not None:
                _put(per_role, f"w_{p}", e, lambda: d_out.transpose(0, 1) @ v)
                _put(per_role, f"b_{p}", e, lambda: d_out.sum(0))
    for role, g in per_role.items():
        slots[role].add_(g)
    return grads


def _backward(grad_y_SH, x_TH, src_S, offsets, k, roles, lora, grads, activation, alpha, limit, keep=None):
    """dx of `experts`; fills grads[role][e] for each role present in `grads` (zeros elsewhere),
    and keep[name][rows of e] for each name of "h", "du", "dg", "y" (the experts' output) in `keep`."""
    w_up, w_gate, w_down, b_up, b_gate, b_down = roles
    l_up, l_gate, l_down = lora
    dx = torch.zeros_like(x_TH)
    bounds = offsets.tolist()
    for e in range(w_up.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        token = src_S[lo:hi] // k
        rows, gy = x_TH[token], grad_y_SH[lo:hi]
        u = _project(rows, e, w_up, b_up, l_up)
        g = None if w_gate is None else _project(rows, e, w_gate, b_gate, l_gate)
        h = activate(g, u, activation, alpha, limit)
        dh = _project_backward(gy, h, e, "down", w_down, l_down, grads)
        dg, du = activate_backward(g, u, dh, activation, alpha, limit)
        drows = _project_backward(du, rows, e, "up", w_up, l_up, grads)
        if g is not None:
            drows = drows + _project_backward(dg, rows, e, "gate", w_gate, l_gate, grads)
        dx.index_add_(0, token, drows)
        for name, v in (("h", h), ("du", du), ("dg", dg), ("y", None)):
            if name in (keep or {}) and (v is not None or name == "y"):
                keep[name][lo:hi] = v if name != "y" else _project(h, e, w_down, b_down, l_down)
    return dx


def _project(v, e, w, b, lora):
    """v W[e]^T + b[e] + s (v A[e]^T) B[e]^T: expert e's projection, LoRA factors never merged."""
    out = _linear(v, w[e], _at(b, e))
    if lora is not None:
        a, b_, s = lora
        out = out + s * (v @ a[e].transpose(0, 1)) @ b_[e].transpose(0, 1)
    return out


def _project_backward(d_out, v, e, p, w, lora, grads):
    """d v of `_project` given d out; stores expert e's share of each wanted role gradient."""
    d_v = d_out @ w[e]
    _put(grads, f"w_{p}", e, lambda: d_out.transpose(0, 1) @ v)
    _put(grads, f"b_{p}", e, lambda: d_out.sum(0))
    if lora is not None:
        a, b, s = lora
        q = s * (d_out @ b[e])                                                  # (n, r)
        d_v = d_v + q @ a[e]
        _put(grads, f"lora_a_{p}", e, lambda: q.transpose(0, 1) @ v)          # (r, K)
        _put(grads, f"lora_b_{p}", e, lambda: s * d_out.transpose(0, 1) @ (v @ a[e].transpose(0, 1)))
    return d_v


def _put(grads, role, e, value):
    if role in grads:
        grads[role][e] = value()


def _at(bias, e):
    return None if bias is None else bias[e]


def _linear(v, w, b):
    out = v @ w.transpose(0, 1)
    return out if b is None else out + b


def combine(y_SH, inv_S, weights_Tk):
    """out[t] = sum_j weights[t, j] * y[inv[t*k + j]], in float32, returned in y's dtype."""
    T, k = weights_Tk.shape
    rows = _acc(y_SH[inv_S]).view(T, k, y_SH.shape[1])
    return (rows * _acc(weights_Tk).unsqueeze(-1)).sum(dim=1).to(y_SH.dtype)


def combine_backward(grad_out_TH, y_SH, inv_S, weights_Tk):
    """(d y, d weights) of `combine`; inv is a permutation, so d y is a scatter, not an add."""
    T, k = weights_Tk.shape
    rows = _acc(y_SH[inv_S]).view(T, k, y_SH.shape[1])                             # scattered
    g = _acc(grad_out_TH).unsqueeze(1)                                               # (T, 1, H)
    grad_weights = (rows * g).sum(-1).to(weights_Tk.dtype)                           # (T, k)
    grad_rows = (g * _acc(weights_Tk).unsqueeze(-1)).view(T * k, y_SH.shape[1]).to(y_SH.dtype)
    return torch.empty_like(y_SH).index_copy_(0, inv_S, grad_rows), grad_weights


def experts_combine(x_TH, src_S, offsets, inv_S, weights_Tk, k, bases, layout, activation, alpha, limit, save):
    """combine(experts(...)) -> (out (T, H), pre): pre (S, 2F) = u | g per grouped row (u alone
    without a gate; zero past offsets[E]) when `save`, else (0,)."""
    pre = x_TH.new_zeros(src_S.shape[0], layouts.preactivation_width(bases, layout)) if save else None
    y = experts(x_TH, src_S, offsets, k, bases, layout, activation, alpha, limit, pre)
    return combine(y, inv_S, weights_Tk), pre if save else x_TH.new_empty(0)


def experts_combine_backward(grad_out_TH, x_TH, src_S, offsets, inv_S, weights_Tk, k, bases, layout, activation,
                             alpha, limit, needs=None):
    """[dx, d weights_Tk, one gradient per base] of `experts_combine`'s out; y, which the routing
    weights' gradient reads, is recomputed in the same loop over experts as the rest."""
    y = torch.zeros(src_S.shape[0], grad_out_TH.shape[1], dtype=x_TH.dtype, device=x_TH.device)
    grad_y, _ = combine_backward(grad_out_TH, y, inv_S, weights_Tk)     # d y needs the weights only
    dx, *grads = experts_backward(grad_y, x_TH, src_S, offsets, k, bases, layout, activation, alpha, limit, needs,
                                  keep={"y": y})
    return [dx, combine_backward(grad_out_TH, y, inv_S, weights_Tk)[1]] + grads


def experts_combine_backward_rows(grad_out_TH, x_TH, src_S, offsets, inv_S, weights_Tk, k, bases, layout,
                                  activation, alpha, limit):
    """[dx, d weights_Tk, w h, du, dg] of `experts_combine`'s out without weight gradients: w h each
    grouped row's activation output times its routing weight (what `down_weight_grads` reads), du /
    dg as `experts_backward_rows` makes them (what `experts_wgrad` reads). No LoRA layouts."""
    y = experts(x_TH, src_S, offsets, k, bases, layout, activation, alpha, limit)
    grad_y, d_weights = combine_backward(grad_out_TH, y, inv_S, weights_Tk)
    dx, h, du, dg = experts_backward_rows(grad_y, x_TH, src_S, offsets, k, bases, layout, activation, alpha, limit)
    hw = h * _acc(weights_Tk).reshape(-1)[src_S].unsqueeze(1).to(h.dtype)
    return [dx, d_weights, hw, du, dg]


def down_weight_grads(grad_out_TH, hw_SF, src_S, offsets, k, weights_Tk, bases, layout, needs):
    """The down projection's gradients (bases of `needs`, None elsewhere) from grad_out and w h:
    dW_down[e] = sum over e's rows of grad_out[t]^T (w h), b_down's the w-weighted grad_out rows."""
    parsed = layouts.parse(layout)
    grads = [torch.zeros_like(w) if need else None for w, need in zip(bases, needs)]
    slots = {role: layouts.view(grads[v.index], v) for role, v in parsed.items() if needs[v.index]}
    per_role = {role: torch.zeros_like(slot) for role, slot in slots.items()}
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        copies = src_S[bounds[e]:bounds[e + 1]]
        go, hw = _acc(grad_out_TH[copies // k]), _acc(hw_SF[bounds[e]:bounds[e + 1]])
        _put(per_role, "w_down", e, lambda: go.transpose(0, 1) @ hw)
        _put(per_role, "b_down", e, lambda: (go * _acc(weights_Tk.reshape(-1)[copies]).unsqueeze(1)).sum(0))
    for role, g in per_role.items():
        slots[role].add_(g)
    return grads
