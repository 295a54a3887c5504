"""Programs that only look like MoE: a top-k or argmax over a linear's outputs, no experts.

moec must leave every one of them alone (0 regions fused, nothing reported by explain).
"""
import torch
import torch.nn as nn

from programs import Attention, DTYPES


class LookAlike(nn.Module):
    def __init__(self, kind, H, V, k, **_):
        super().__init__()
        self.kind, self.k = kind, min(k, V)
        self.head = nn.Linear(H, V, bias=False)             # (V, H): a "router" of V outputs
        self.emb = nn.Embedding(V, H)                       # (V, H) table, 2D: no expert stack
        self.attn = Attention(H)

    def forward(self, x):                                   # (T, H)
        if self.kind == "topk_sampling":                    # top-k over vocabulary logits
            p, ids = self.head(x).softmax(dim=-1).topk(self.k, dim=-1)     # (T, k)
            return p / p.sum(dim=-1, keepdim=True), ids
        if self.kind == "topk_embedding_mix":               # weighted mix of the top-k embeddings
            p, ids = self.head(x).softmax(dim=-1).topk(self.k, dim=-1)
            return x + (p.unsqueeze(-1) * self.emb(ids)).sum(dim=1)        # (T, H)
        if self.kind == "argmax_codebook":                  # VQ-style nearest code, argmax "routing"
            return x + self.emb(self.head(x).argmax(dim=-1))
        return x + self.attn(x)                             # attention softmax over tokens


def build_look_alike(spec) -> nn.Module:
    torch.manual_seed(spec["seed"])
    return LookAlike(**spec).to(DTYPES[spec["dtype"]])


def look_alike_input(spec, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec["tokens"], spec["H"], generator=g, dtype=torch.float64).to(DTYPES[spec["dtype"]])
