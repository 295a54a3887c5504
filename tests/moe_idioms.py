"""Hand-written MoE layers in the idioms real code uses beyond Hugging Face, and look-alikes.

Each is written from its paper's or project's description, not copied: a torchtitan-style
sorted grouped layer, a DeepSpeed/GShard-style top-2 gate with capacity and einsum dispatch, a
loop over range(E) with masks, and modules that only look like MoE (top-k sampling, attention).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SortedGroupedMoE(nn.Module):
    """torchtitan-style: sigmoid or softmax scores, argsort dispatch, separate w1/w3/w2 (E, ...)
    weights through torch._grouped_mm, scatter_add combine, optional shared expert. bf16, as
    torch._grouped_mm requires on the CPU."""

    def __init__(self, hidden=32, ffn=16, experts=4, top_k=2, score="softmax", shared=False, clamp_ids=False):
        super().__init__()
        self.k, self.E, self.score, self.clamp_ids = top_k, experts, score, clamp_ids
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, ffn, hidden) / hidden ** 0.5)
        self.w3 = nn.Parameter(torch.randn(experts, ffn, hidden) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, ffn) / ffn ** 0.5)
        self.shared = nn.Sequential(nn.Linear(hidden, ffn), nn.SiLU(), nn.Linear(ffn, hidden)) if shared else None
        self.to(torch.bfloat16)

    def forward(self, x):                                             # (B, S, H)
        bs, slen, dim = x.shape
        x = x.view(-1, dim)                                           # (T, H)
        scores = self.gate(x)
        scores = torch.sigmoid(scores.float()) if self.score == "sigmoid" else F.softmax(scores.float(), dim=1)
        top_scores, selected = torch.topk(scores, k=self.k, dim=1)    # (T, k)
        order = torch.argsort(selected.view(-1), stable=True)         # grouped slot -> copy
        counts = torch.histc(selected.view(-1).float(), bins=self.E, min=0, max=self.E - 1)
        if self.clamp_ids:   # Hugging Face's grouped_mm on CUDA: sorted ids clamped in place, never read after
            selected.view(-1)[order].clamp_(max=self.E - 1)
        offsets = torch.cumsum(counts, 0).to(torch.int32)             # (E,) ends of expert slices
        token_idx = order // self.k
        routed = x[token_idx]                                         # (T*k, H) grouped
        h = F.silu(torch._grouped_mm(routed, self.w1.transpose(-2, -1), offs=offsets))
        h = h * torch._grouped_mm(routed, self.w3.transpose(-2, -1), offs=offsets)
        routed_out = torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offsets)
        routed_out = routed_out * top_scores.view(-1)[order].reshape(-1, 1).to(x.dtype)
        out = torch.zeros_like(x).scatter_add(0, token_idx.reshape(-1, 1).expand(-1, dim), routed_out)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(bs, slen, dim)


class MaskLoopMoE(nn.Module):
    """A loop over range(E) with torch.where and index_add_ (Mixtral's original style), per-expert
    Linear modules are NOT used: weights are stacked (E, 2F, H) with gate and up concatenated."""

    def __init__(self, hidden=32, ffn=16, experts=4, top_k=2, act="silu", router="linear"):
        super().__init__()
        self.k, self.E, self.act, self.router = top_k, experts, act, router
        # router: nn.Linear; "matmul_t": x @ W.T and "einsum": einsum("th,eh->te", x, W) with W (E, H);
        # "matmul_he": torch.matmul(x, W), W (H, E)
        self.gate = nn.Linear(hidden, experts, bias=False) if router == "linear" else nn.Parameter(
            torch.randn((hidden, experts) if router == "matmul_he" else (experts, hidden)) / hidden ** 0.5)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * ffn, hidden) / hidden ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, ffn) / ffn ** 0.5)

    def forward(self, x):                                             # (T, H)
        if self.router == "linear":
            logits = self.gate(x)
        elif self.router == "matmul_t":
            logits = x @ self.gate.T
        elif self.router == "einsum":
            logits = torch.einsum("th,eh->te", x, self.gate)
        else:
            logits = torch.matmul(x, self.gate)
        w = F.softmax(logits, dim=-1, dtype=torch.float)
        w, ids = torch.topk(w, self.k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = torch.where(ids == e)
            g, u = F.linear(x[tok], self.gate_up[e]).chunk(2, dim=-1)
            h = {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[self.act](g) * u
            out.index_add_(0, tok, F.linear(h, self.down[e]) * w[tok, slot, None])
        return out


class GroupedRouterMoE(nn.Module):
    """DeepSeek-V3's grouped top-k, the dropped groups masked three ways: `scores * mask` and
    `where(mask, scores, 0.0)` (a dropped expert then outranks a kept one whose biased score is
    negative) or `masked_fill(~mask, -inf)` (never chosen). The score bias starts at zero, as
    checkpoints initialise it, so the masks agree until training moves it. float64, a mask loop."""

    def __init__(self, how="mul", hidden=16, ffn=8, experts=8, groups=4, keep_groups=2, top_k=3):
        super().__init__()
        self.how, self.E, self.G, self.tg, self.k = how, experts, groups, keep_groups, top_k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.register_buffer("score_bias", torch.zeros(experts))
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * ffn, hidden) / hidden ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, ffn) / ffn ** 0.5)
        self.double()

    def forward(self, x):                                             # (T, H)
        scores = torch.sigmoid(self.router(x))
        choice = scores + self.score_bias
        group_scores = choice.view(-1, self.G, self.E // self.G).topk(2, dim=-1)[0].sum(-1)
        mask = torch.zeros_like(group_scores)
        mask.scatter_(1, group_scores.topk(self.tg, dim=-1)[1], 1)
        keep = mask.unsqueeze(-1).expand(-1, self.G, self.E // self.G).reshape(-1, self.E)
        if self.how == "mul":
            choice = choice * keep
        elif self.how == "where":
            choice = torch.where(keep.bool(), choice, 0.0)
        else:
            choice = choice.masked_fill(~keep.bool(), float("-inf"))
        ids = torch.topk(choice, self.k, dim=-1)[1]
        w = scores.gather(1, ids)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = torch.where(ids == e)
            g, u = F.linear(x[tok], self.gate_up[e]).chunk(2, dim=-1)
            out.index_add_(0, tok, F.linear(F.silu(g) * u, self.down[e]) * w[tok, slot, None])
        return out


class CapacityTop2MoE(nn.Module):
    """DeepSpeed/GShard-style top-2 gate with a capacity factor and einsum dispatch/combine."""

    def __init__(self, hidden=32, ffn=16, experts=4, capacity_factor=1.0):
        super().__init__()
        self.E, self.cf = experts, capacity_factor
        self.wg = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, hidden, ffn) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, ffn, hidden) / ffn ** 0.5)

    def forward(self, x):                                             # (T, H)
        T = x.shape[0]
        capacity = max(int(self.cf * 2 * T / self.E), 1)
        gates = F.softmax(self.wg(x), dim=1)
        idx1 = torch.argmax(gates, dim=1)
        mask1 = F.one_hot(idx1, self.E)
        idx2 = torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=1)
        mask2 = F.one_hot(idx2, self.E)
        loc1 = torch.cumsum(mask1, 0) - 1
        loc2 = torch.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdim=True)
        mask1 = mask1 * (loc1 < capacity)
        mask2 = mask2 * (loc2 < capacity)
        g1 = (gates * mask1).sum(1)
        g2 = (gates * mask2).sum(1)
        denom = (g1 + g2).clamp_min(torch.finfo(gates.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
        l1 = F.one_hot((loc1 * mask1).sum(1), capacity)
        l2 = F.one_hot((loc2 * mask2).sum(1), capacity)
        combine = (g1[:, None, None] * mask1[:, :, None] * l1[:, None, :]
                   + g2[:, None, None] * mask2[:, :, None] * l2[:, None, :])  # (T, E, C)
        dispatch = combine.bool().to(x.dtype)
        xe = torch.einsum("tec,th->ech", dispatch, x)                   # (E, C, H)
        h = F.relu(torch.einsum("ech,ehf->ecf", xe, self.w1))
        ye = torch.einsum("ecf,efh->ech", h, self.w2)
        return torch.einsum("tec,ech->th", combine.to(x.dtype), ye)


class TopKSampler(nn.Module):
    """Look-alike: top-k over vocabulary logits then sampling weights. Not an MoE."""

    def __init__(self, hidden=32, vocab=48, k=4):
        super().__init__()
        self.head, self.k = nn.Linear(hidden, vocab, bias=False), k

    def forward(self, x):
        probs = self.head(x).softmax(-1)
        p, ids = probs.topk(self.k, dim=-1)
        return (p / p.sum(-1, keepdim=True)), ids


class Attention(nn.Module):
    """Look-alike: softmax attention with a (T, H)-shaped output. Not an MoE."""

    def __init__(self, hidden=32):
        super().__init__()
        self.qkv, self.o = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)

    def forward(self, x):                                             # (T, H)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = (q @ k.t() / q.shape[-1] ** 0.5).softmax(-1)
        return self.o(a @ v)
