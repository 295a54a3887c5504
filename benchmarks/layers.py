"""One MoE layer four ways, for bench_layer.py: moec ops, an HF-style eager loop over experts, an
HF-style torch._grouped_mm version (eager or under torch.compile). Our own code, written in the
style of transformers' MoE blocks; routing uses moec's plain-PyTorch reference (softmax/top-k).
Shapes: x (T, H), router (E, H), gate_up (E, 2F, H), down (E, H, F).
"""
from dataclasses import dataclass

import torch

from moec.codegen import layout, reference


@dataclass(frozen=True)
class Shape:
    name: str
    E: int
    k: int
    H: int
    F: int
    scoring: str = "softmax"
    renormalize: bool = True
    activation: str = "silu"
    interleaved: bool = False      # GPT-OSS: gate = rows 0::2 of gate_up, up = rows 1::2
    biases: bool = False
    n_group: int = 1
    topk_group: int = 1
    shared_F: int = 0              # DeepSeek-V3: one always-on shared expert of this width


SHAPES = {
    "olmoe": Shape("OLMoE", 64, 8, 2048, 1024, renormalize=False),
    "qwen3": Shape("Qwen3-30B-A3B", 128, 8, 2048, 768),
    "deepseek": Shape("DeepSeek-V3", 256, 8, 7168, 2048, scoring="sigmoid", n_group=8, topk_group=4,
                      shared_F=2048),
    "mixtral": Shape("Mixtral-8x7B", 8, 2, 4096, 14336),
    "gptoss": Shape("GPT-OSS-20B", 32, 4, 2880, 2880, scoring="softmax_after_topk", activation="swiglu_oai",
                    interleaved=True, biases=True),
}
ALPHA, LIMIT = 1.702, 7.0


def make_params(s: Shape, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, scale):
        # a slice of the leading dim at a time: DeepSeek-V3's gate_up in float32 at once is 30 GB
        out = torch.empty(*shape, device=device, dtype=dtype)
        for i in range(shape[0]):
            out[i] = torch.randn(*shape[1:], device=device, generator=g) * scale
        return out.requires_grad_()
    p = {"router": r(s.E, s.H, scale=s.H ** -0.5), "gate_up": r(s.E, 2 * s.F, s.H, scale=s.H ** -0.5),
         "down": r(s.E, s.H, s.F, scale=s.F ** -0.5)}
    if s.scoring == "sigmoid":
        p["score_bias"] = torch.randn(s.E, device=device, generator=g) * 0.01
    if s.biases:
        p["b_gate_up"] = r(s.E, 2 * s.F, scale=0.1)
        p["b_down"] = r(s.E, s.H, scale=0.1)
    if s.shared_F:
        p["shared_gate_up"] = r(2 * s.shared_F, s.H, scale=s.H ** -0.5)
        p["shared_down"] = r(s.H, s.shared_F, scale=s.shared_F ** -0.5)
    return p


def split(s: Shape, p):
    """(w_up, w_gate, b_up, b_gate): views of the fused gate_up parameter, never copies."""
    gu, b = p["gate_up"], p.get("b_gate_up")
    if s.interleaved:
        return gu[:, 1::2], gu[:, 0::2], None if b is None else b[:, 1::2], None if b is None else b[:, 0::2]
    return gu[:, s.F:], gu[:, :s.F], None if b is None else b[:, s.F:], None if b is None else b[:, :s.F]


def moec_weights(s: Shape, p):
    """(bases, layout) for moec.experts: the fused parameters themselves, read as `split` reads them."""
    F, gu, b = s.F, p["gate_up"], p.get("b_gate_up")
    up, gate = ((1, 2, None), (0, 2, None)) if s.interleaved else ((F, 1, 2 * F), (0, 1, F))
    bias = lambda sl: None if b is None else (b, False, sl)
    bd = p.get("b_down")
    return layout.pack(((gu, False, up), (gu, False, gate), (p["down"], False, None), bias(up), bias(gate),
                        None if bd is None else (bd, False, None)))


def tile_origins(s: Shape, tokens, device, kernels=("gate_up", "down")) -> str:
    """Each forward kernel's launch settings at this token count and where they come from
    (tuning.origin): printed beside host and decode timings, which a stale user table changes."""
    from moec.codegen import tuning
    dt = torch.bfloat16
    return "; ".join(f"{k} T{tokens}: {tuning.tile(k, s.E, s.k, s.H, s.F, dt, device, tokens)} from "
                     f"{tuning.origin(k, s.E, s.k, s.H, s.F, dt, device, tokens)}" for k in kernels)


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in float32: a method's error against the reference layer."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _route(s, p, x):
    logits = x @ p["router"].t()
    return reference.route(logits, p.get("score_bias"), s.k, s.scoring, s.renormalize, 1.0, s.n_group,
                           s.topk_group)


def _plus_shared(s, p, x, out):
    """out + the shared expert's output; out itself without one (an `out + 0` would be a kernel of
    its own in eager mode, 2-3 us of a decode step, that a compiled model never runs)."""
    if not s.shared_F:
        return out
    g, u = (x @ p["shared_gate_up"].t()).chunk(2, dim=-1)
    return out + (torch.nn.functional.silu(g) * u) @ p["shared_down"].t()


def _moec_routing(s, p, x):
    """route then plan, as the rewrite emits them (before fuse_routing)."""
    w, ids = torch.ops.moec.route(x @ p["router"].t(), p.get("score_bias"), s.k, s.scoring, s.renormalize, 1.0,
                                  s.n_group, s.topk_group)
    return (w, *torch.ops.moec.plan(ids, s.E))


def route_plan(s, p, x):
    """fuse_routing's routing: the router GEMM, then route_plan."""
    return torch.ops.moec.route_plan(x @ p["router"].t(), p.get("score_bias"), s.k, s.scoring, s.renormalize, 1.0,
                                     s.n_group, s.topk_group, s.E)


def router_plan(s, p, x):
    """fuse_router's routing (MOEC_ROUTER_PLAN=1): the router GEMM inside the routing's launch."""
    return torch.ops.moec.router_plan(x, p["router"], None, p.get("score_bias"), s.k, s.scoring, s.renormalize, 1.0,
                                      s.n_group, s.topk_group, s.E)[1:]


def moec_layer(s, p, x, routing=route_plan):
    # what moec's passes emit for a layer on one device: route_plan (fuse_routing), experts_combine
    w, _, offsets, src, inv = routing(s, p, x)
    bases, layout = moec_weights(s, p)
    # what moec's fuse_combine pass emits: pre-activations kept only when a backward will run
    save = torch.is_grad_enabled() and (x.requires_grad or any(b.requires_grad for b in bases))
    out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, w, s.k, bases, layout, s.activation, ALPHA,
                                            LIMIT, save)
    return _plus_shared(s, p, x, out)


def moec_unfused_layer(s, p, x):
    """moec's ops before `fuse_combine` and `fuse_routing` (experts and combine apart where those
    do not apply: expert parallelism, LoRA): the backward recomputing the pre-activations."""
    w, offsets, src, inv = _moec_routing(s, p, x)
    bases, layout = moec_weights(s, p)
    y = torch.ops.moec.experts(x, src, offsets, s.k, bases, layout, s.activation, ALPHA, LIMIT)
    return _plus_shared(s, p, x, torch.ops.moec.combine(y, inv, w))


def hf_loop_layer(s, p, x):
    """transformers' classic loop: one_hot mask, loop over hit experts, index_add back."""
    w, ids = _route(s, p, x)
    w_up, w_gate, b_up, b_gate = split(s, p)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    mask = torch.nn.functional.one_hot(ids, s.E).permute(2, 1, 0)          # (E, k, T)
    for e in (mask.sum(dim=(1, 2)) > 0).nonzero().flatten().tolist():
        slot, tok = torch.where(mask[e])
        rows = x[tok]
        u = rows @ w_up[e].t() + (0 if b_up is None else b_up[e])
        g = rows @ w_gate[e].t() + (0 if b_gate is None else b_gate[e])
        y = reference.activate(g, u, s.activation, ALPHA, LIMIT) @ p["down"][e].t()
        y = y + (0 if "b_down" not in p else p["b_down"][e])
        out.index_add_(0, tok, (y * w[tok, slot, None]).float())
    return _plus_shared(s, p, x, out.to(x.dtype))


def hf_grouped_layer(s, p, x):
    """transformers' grouped_mm path: sort copies by expert, two torch._grouped_mm, scatter-add."""
    T = x.shape[0]
    w, ids = _route(s, p, x)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.histc(flat.float(), bins=s.E, min=0, max=s.E - 1)            # static shape, as HF
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tok = order // s.k
    rows = x[tok]
    gu = torch._grouped_mm(rows, p["gate_up"].transpose(1, 2), offs=offs)     # (S, 2F), one GEMM
    e_of_row = flat[order]
    if "b_gate_up" in p:
        gu = gu + p["b_gate_up"][e_of_row]
    g, u = (gu[:, 0::2], gu[:, 1::2]) if s.interleaved else (gu[:, :s.F], gu[:, s.F:])
    h = reference.activate(g, u, s.activation, ALPHA, LIMIT)
    y = torch._grouped_mm(h, p["down"].transpose(1, 2), offs=offs)
    if "b_down" in p:
        y = y + p["b_down"][e_of_row]
    y = y * w.reshape(-1)[order, None].to(y.dtype)
    out = torch.zeros(T, s.H, dtype=torch.float32, device=x.device).index_add_(0, tok, y.float())
    return _plus_shared(s, p, x, out.to(x.dtype))
