"""MoE programs built from independent choices, for the property tests.

A `MoESpec` names one choice per axis (router, k/E/H/F, activation, weight layout, dispatch
idiom, combine, shared expert); `MoELayer(spec)` is the nn.Module a user would write for it.
A `ProgramSpec` adds the dense code around it (norm, residual, attention, a second MoE layer),
the dtype and the token count; `build(spec)` returns the whole model, seeded.

Legend: T tokens, H hidden, E experts, k top-k, F expert FFN width, G expert groups.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

GATED = ("swiglu", "geglu", "swiglu_oai")
OAI_ALPHA, OAI_LIMIT = 1.702, 7.0


@dataclass(frozen=True)
class MoESpec:
    router: str        # softmax_topk | topk_softmax | sigmoid_bias | grouped
    renorm: bool       # divide the k weights by their sum
    scale: float       # routed scaling factor (1.0: no multiply in the graph)
    score_fp32: bool   # score in float32 (HF's softmax(..., dtype=torch.float)) or in the model dtype
    E: int
    k: int
    H: int
    F: int
    G: int             # expert groups (grouped router only; else 1)
    topk_group: int    # groups kept (grouped router only; else 1)
    act: str           # swiglu | geglu | gelu | relu | swiglu_oai (GPT-OSS, with expert biases)
    layout: str        # gated: concat | interleaved | separate | transposed; else standard | transposed
    dispatch: str      # where_loop | mask_loop | sort_gather | sort_split | dense_bmm | module_list
    combine: str       # index_add | scatter_add (sparse dispatch); einsum | bmm (dense_bmm)
    shared: str        # none | plain | gated
    renorm_eps: float = 0.0   # DeepSeek adds 1e-20 to the sum it renormalises by; others add nothing
    router_op: str = "linear"  # linear (nn.Linear) | matmul_t (x @ W.T) | matmul_he (x @ W, W (H, E)) | einsum


@dataclass(frozen=True)
class ProgramSpec:
    moe: MoESpec
    dtype: str         # float32 | float64
    tokens: int        # T; the input is (T, H), or (2, T // 2, H) when batched
    batched: bool
    norm: bool
    residual: bool
    attention: bool
    second_moe: bool
    seed: int

    @property
    def input_shape(self):
        H = self.moe.H
        return (2, self.tokens // 2, H) if self.batched else (self.tokens, H)

    @property
    def num_moe_layers(self):
        return 2 if self.second_moe else 1


def _randn(*shape, fan_in):
    return nn.Parameter(torch.randn(*shape) / fan_in ** 0.5)


class _Expert(nn.Module):
    """One expert as per-expert nn.Linear modules (the ModuleList idiom)."""

    def __init__(self, s: MoESpec):
        super().__init__()
        bias = s.act == "swiglu_oai"
        self.act = s.act
        self.up = nn.Linear(s.H, s.F, bias=bias)
        self.gate = nn.Linear(s.H, s.F, bias=bias) if s.act in GATED else None
        self.down = nn.Linear(s.F, s.H, bias=bias)

    def forward(self, x):                                     # (n, H) -> (n, H)
        u = self.up(x)
        return self.down(_activate(self.gate(x) if self.gate is not None else None, u, self.act))


def _mm(a, W, transposed):
    """a @ W[e].T (or a @ W[e] for transposed storage), per expert, per copy or batched."""
    if W.dim() == 2:
        return a @ W if transposed else F.linear(a, W)
    if a.dim() == 2:                                          # one weight per copy: (S, n) x (S, ., .)
        return _mm(a[:, None, :], W, transposed)[:, 0]
    return torch.bmm(a, W if transposed else W.transpose(1, 2))


def _bias(b, h):
    return b[:, None, :] if b.dim() == 2 and h.dim() == 3 else b


def _activate(g, u, act):
    if act == "swiglu":
        return F.silu(g) * u
    if act == "geglu":
        return F.gelu(g) * u
    if act == "swiglu_oai":
        g, u = g.clamp(max=OAI_LIMIT), u.clamp(min=-OAI_LIMIT, max=OAI_LIMIT)
        return (u + 1) * (g * torch.sigmoid(g * OAI_ALPHA))
    return F.gelu(u) if act == "gelu" else F.relu(u)


class MoELayer(nn.Module):
    """(..., H) -> (..., H). Weights are stored as `spec.layout` says; the forward is written in
    `spec.dispatch`'s idiom, so the same function appears as differently shaped graphs."""

    def __init__(self, s: MoESpec):
        super().__init__()
        self.s = s
        E, H, Fw = s.E, s.H, s.F
        if s.router_op == "linear":
            self.router = nn.Linear(H, E, bias=s.router == "topk_softmax")
        else:   # a bare weight (code without nn.Linear), its bias (GPT-OSS's router has one) added after
            self.router_w = _randn(*((H, E) if s.router_op == "matmul_he" else (E, H)), fan_in=H)
            self.router_b = _randn(E, fan_in=H) if s.router == "topk_softmax" else None
        if s.router in ("sigmoid_bias", "grouped"):
            # DeepSeek's e_score_correction_bias: a buffer, small, as after load-balancing updates.
            self.register_buffer("score_bias", torch.randn(E) * 0.01)
        if s.dispatch == "module_list":
            self.experts = nn.ModuleList(_Expert(s) for _ in range(E))
        else:
            gated = s.act in GATED
            if s.layout == "separate":
                self.w_gate, self.w_up = _randn(E, Fw, H, fan_in=H), _randn(E, Fw, H, fan_in=H)
            elif s.layout == "transposed":                     # x @ w: (E, H, 2F) / (E, H, F)
                self.w_in = _randn(E, H, (2 if gated else 1) * Fw, fan_in=H)
            else:                                              # F.linear: (E, 2F, H) / (E, F, H)
                self.w_in = _randn(E, (2 if gated else 1) * Fw, H, fan_in=H)
            self.w_down = _randn(E, Fw, H, fan_in=Fw) if s.layout == "transposed" else _randn(E, H, Fw, fan_in=Fw)
            if s.act == "swiglu_oai":
                self.b_in = _randn(E, 2 * Fw, fan_in=H)
                self.b_down = _randn(E, H, fan_in=Fw)
        if s.shared != "none":
            self.shared = _Expert(MoESpec(**{**s.__dict__, "act": "swiglu"}))
            self.shared_gate = nn.Linear(H, 1, bias=False) if s.shared == "gated" else None

    # -------------------------------------------------------------------- routing
    def _logits(self, x):
        op = self.s.router_op
        if op == "linear":
            return self.router(x)
        if op == "matmul_t":
            logits = x @ self.router_w.T
        elif op == "matmul_he":
            logits = torch.matmul(x, self.router_w)
        else:
            logits = torch.einsum("th,eh->te", x, self.router_w)
        return logits if self.router_b is None else logits + self.router_b

    def route(self, x):                                       # (T, H) -> w (T, k) x.dtype, ids (T, k)
        s = self.s
        logits = self._logits(x)                              # (T, E)
        if s.score_fp32:
            logits = logits.float()
        if s.router == "softmax_topk":
            w, ids = torch.topk(F.softmax(logits, dim=-1), s.k, dim=-1)
        elif s.router == "topk_softmax":
            top, ids = torch.topk(logits, s.k, dim=-1)
            w = F.softmax(top, dim=-1)
        else:
            scores = torch.sigmoid(logits)
            choice = scores + self.score_bias
            if s.router == "grouped":
                T = choice.shape[0]
                group_scores = choice.view(-1, s.G, s.E // s.G).topk(2, dim=-1)[0].sum(dim=-1)       # (T, G)
                group_idx = group_scores.topk(s.topk_group, dim=-1, sorted=False)[1]
                group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
                keep = group_mask.unsqueeze(-1).expand(-1, s.G, s.E // s.G).reshape(-1, s.E)  # (T, E)
                choice = choice.masked_fill(~keep.bool(), 0.0)
            ids = torch.topk(choice, s.k, dim=-1, sorted=False)[1]
            w = scores.gather(1, ids)
        if s.renorm and s.router != "topk_softmax":
            denom = w.sum(dim=-1, keepdim=True)
            w = w / (denom + s.renorm_eps if s.renorm_eps else denom)
        if s.scale != 1.0:
            w = w * s.scale
        return w.to(x.dtype), ids

    # -------------------------------------------------------------------- experts
    def ffn(self, xs, pick):
        """Experts on tokens. `pick` selects from each (E, ...) weight: `W[e]` for one expert on
        (n, H), `W` itself for all experts on (E, T, H), `W[e_S]` for one expert per copy on (S, H)."""
        s = self.s
        t = s.layout == "transposed"
        g = None
        if s.layout == "separate":
            g, u = _mm(xs, pick(self.w_gate), t), _mm(xs, pick(self.w_up), t)
            if s.act == "swiglu_oai":                       # b_in holds [gate bias | up bias]
                b = _bias(pick(self.b_in), g)
                g, u = g + b[..., :s.F], u + b[..., s.F:]
        else:
            h = _mm(xs, pick(self.w_in), t)                   # (.., 2F) or (.., F)
            if s.act == "swiglu_oai":
                h = h + _bias(pick(self.b_in), h)
            if s.act not in GATED:
                u = h
            elif s.layout == "interleaved" or s.act == "swiglu_oai" and s.layout != "concat":
                g, u = h[..., ::2], h[..., 1::2]
            else:
                g, u = h.chunk(2, dim=-1)
        y = _mm(_activate(g, u, s.act), pick(self.w_down), t)
        return y + _bias(pick(self.b_down), y) if s.act == "swiglu_oai" else y

    def expert(self, e, xs):                                  # expert e on (n, H) -> (n, H)
        if self.s.dispatch == "module_list":
            return self.experts[e](xs)
        return self.ffn(xs, lambda W: W[e])

    # -------------------------------------------------------------------- dispatch + combine
    def forward(self, x):
        s = self.s
        shape = x.shape
        x = x.reshape(-1, s.H)                                # (T, H)
        w, ids = self.route(x)                                # (T, k), (T, k)
        out = getattr(self, "_" + s.dispatch if s.dispatch != "module_list" else "_where_loop")(x, w, ids)
        if s.shared != "none":
            sh = self.shared(x)
            out = out + (torch.sigmoid(self.shared_gate(x)) * sh if self.shared_gate is not None else sh)
        return out.reshape(shape)

    def _add(self, out, tok, y):                              # out[tok] += y, with duplicates
        if self.s.combine == "index_add":
            return out.index_add_(0, tok, y)
        return out.scatter_add_(0, tok[:, None].expand(-1, self.s.H), y)

    def _where_loop(self, x, w, ids):
        out = torch.zeros_like(x)
        for e in range(self.s.E):
            tok, slot = torch.where(ids == e)                 # (n,), (n,)
            self._add(out, tok, self.expert(e, x[tok]) * w[tok, slot, None])
        return out

    def _mask_loop(self, x, w, ids):
        out = torch.zeros_like(x)
        for e in range(self.s.E):
            mask = ids == e                                   # (T, k)
            tok = torch.nonzero(mask.any(dim=-1)).squeeze(-1)  # (n,)
            we = (w * mask).sum(dim=-1)[tok]                  # (n,)
            self._add(out, tok, self.expert(e, x[tok]) * we[:, None])
        return out

    def _sort_gather(self, x, w, ids):
        """argsort the T*k copies by expert, gather tokens, run each copy through its expert's
        weights gathered per copy (bmm), scatter back: no data-dependent shapes."""
        s = self.s
        order = ids.reshape(-1).argsort(stable=True)          # grouped slot -> copy
        tok, e = order // s.k, ids.reshape(-1)[order]         # (T*k,), (T*k,)
        ys = self.ffn(x[tok], lambda W: W[e])                 # (T*k, H)
        return self._add(torch.zeros_like(x), tok, ys * w.reshape(-1)[order, None])

    def _sort_split(self, x, w, ids):
        """torchtitan's for-loop experts: sort copies by expert, split by per-expert counts."""
        s = self.s
        order = ids.reshape(-1).argsort(stable=True)
        tok = order // s.k
        counts = torch.bincount(ids.reshape(-1), minlength=s.E).tolist()
        xs = torch.split(x[tok], counts, dim=0)
        ys = torch.cat([self.expert(e, xs[e]) for e in range(s.E)], dim=0)   # (T*k, H) grouped
        return self._add(torch.zeros_like(x), tok, ys * w.reshape(-1)[order, None])

    def _dense_bmm(self, x, w, ids):
        """Every expert on every token, weighted by one-hot routing weights (T, E)."""
        y = self.ffn(x.unsqueeze(0).expand(self.s.E, -1, -1), lambda W: W)   # (E, T, H)
        cw = (F.one_hot(ids, self.s.E).to(w.dtype) * w.unsqueeze(-1)).sum(dim=1)   # (T, E)
        if self.s.combine == "einsum":
            return torch.einsum("te,eth->th", cw, y)
        return torch.bmm(cw.unsqueeze(1), y.transpose(0, 1)).squeeze(1)


class Attention(nn.Module):
    """Unmasked single-head attention over the token dim: equivariant under token permutation."""

    def __init__(self, H):
        super().__init__()
        self.qkv, self.o = nn.Linear(H, 3 * H), nn.Linear(H, H)

    def forward(self, x):                                     # (..., T, H)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(dim=-1)
        return self.o(a @ v)


class Program(nn.Module):
    """[attention] -> [norm] -> MoE -> [residual] -> ([norm] -> MoE -> [residual])."""

    def __init__(self, p: ProgramSpec):
        super().__init__()
        self.p = p
        H = p.moe.H
        self.attn = Attention(H) if p.attention else None
        self.layers = nn.ModuleList(MoELayer(p.moe) for _ in range(p.num_moe_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(H) if p.norm else nn.Identity() for _ in self.layers)

    def forward(self, x):                                     # (T, H) or (B, S, H)
        if self.attn is not None:
            x = x + self.attn(x)
        for norm, moe in zip(self.norms, self.layers):
            y = moe(norm(x))
            x = x + y if self.p.residual else y
        return x


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build(p: ProgramSpec) -> nn.Module:
    torch.manual_seed(p.seed)
    return Program(p).to(DTYPES[p.dtype])


def make_input(p: ProgramSpec, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p.input_shape, generator=g, dtype=torch.float64).mul(scale).to(DTYPES[p.dtype])
