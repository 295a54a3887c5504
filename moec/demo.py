"""`python -m moec.demo`: compile a tiny MoE transformer on the CPU with backend="moec",
print what moec found, and check outputs and gradients against eager PyTorch."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import moec


class MoE(nn.Module):
    """Softmax top-k router and SwiGLU experts stored as 3D weights, dispatched by sorting."""

    def __init__(self, hidden, ffn, experts, top_k):
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(experts, 2 * ffn, hidden) / hidden ** 0.5)
        self.w_down = nn.Parameter(torch.randn(experts, hidden, ffn) / ffn ** 0.5)

    def forward(self, x):                                    # x: (B, S, H)
        x_th = x.reshape(-1, x.shape[-1])                     # (T, H)
        probs = self.router(x_th).softmax(dim=-1)             # (T, E)
        weights, ids = probs.topk(self.top_k, dim=-1)         # (T, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x_th)
        for e in range(self.num_experts):
            token, slot = torch.where(ids == e)
            gate, up = F.linear(x_th[token], self.w_gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w_down[e])
            out = out.index_add(0, token, y * weights[token, slot, None])
        return out.reshape(x.shape)


class Block(nn.Module):
    def __init__(self, hidden, heads, ffn, experts, top_k):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.heads = heads
        self.moe = MoE(hidden, ffn, experts, top_k)

    def forward(self, x):                                    # x: (B, S, H)
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.moe(self.norm2(x))


class TinyMoETransformer(nn.Module):
    def __init__(self, vocab=128, hidden=64, heads=4, ffn=32, experts=8, top_k=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn, experts, top_k) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):                               # tokens: (B, S)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def main():
    torch.manual_seed(0)
    model = TinyMoETransformer()
    tokens = torch.randint(0, 128, (2, 16))
    print(moec.explain(model, tokens))
    compiled = torch.compile(model, backend="moec")
    out = compiled(tokens)
    out.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(tokens)
    ref.float().pow(2).mean().backward()
    out_err = (out - ref).abs().max().item()
    grad_err = max((g - p.grad).abs().max().item() for g, p in zip(grads, model.parameters()))
    print(f"\ncompiled vs eager: max |output diff| = {out_err:.2e}, max |grad diff| = {grad_err:.2e}")
    if out_err > 1e-4 or grad_err > 1e-4:
        raise SystemExit("moec demo: compiled result differs from eager")
    print("ok")


if __name__ == "__main__":
    main()
