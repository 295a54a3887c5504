"""Token counts and routing change every step: at most one recompile for a new batch shape,
none for new routing, and results stay exact at every size."""
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters

from e2e.hf_models import moe_block
from moec.capture import _SIZE_OBLIVIOUS_LOWERS

# Where moec cannot trace sizes size-obliviously (torch 2.11: moec/capture.py says why), a size of 1
# compiles a graph of its own, Dynamo's 0/1 specialisation.
ONES_APART = 0 if _SIZE_OBLIVIOUS_LOWERS else 1


def _run(compiled, block, x):
    out = compiled(x)
    torch.testing.assert_close(out, block(x), rtol=1e-4, atol=1e-6)


def test_new_shapes_recompile_at_most_once_and_routing_never():
    block = moe_block("qwen3_moe", "batched_mm").double()
    compiled = torch.compile(block, backend="moec", options={"dense_backend": "eager"})
    _run(compiled, block, torch.randn(2, 5, 32, dtype=torch.float64))
    assert counters["moec"]["graphs"] == 1
    for shape in [(3, 7, 32), (4, 9, 32), (1, 13, 32), (1, 1, 32), (5, 2, 32)]:
        _run(compiled, block, torch.randn(shape, dtype=torch.float64))
    graphs = 2 + 2 * ONES_APART                     # one more, with symbolic batch and sequence
    assert counters["moec"]["graphs"] == graphs     # (2.11: and one each for a batch and a sequence of 1)
    assert counters["moec"]["regions_fused"] == graphs   # and they are fused too
    for _ in range(3):                              # new tokens, new routing, same shape
        _run(compiled, block, torch.randn(5, 2, 32, dtype=torch.float64) * 3)
    assert counters["moec"]["graphs"] == graphs


def test_zero_tokens_after_compile():
    block = moe_block("mixtral", "batched_mm").double()
    compiled = torch.compile(block, backend="moec", options={"dense_backend": "eager"})
    _run(compiled, block, torch.randn(2, 5, 32, dtype=torch.float64))
    _run(compiled, block, torch.randn(3, 4, 32, dtype=torch.float64))
    out = compiled(torch.randn(0, 4, 32, dtype=torch.float64))
    assert out.shape == (0, 4, 32)


@dataclass(frozen=True)
class _Widths:
    E: int
    H: int
    F: int
    k: int = 2


def _grouped_layer(c, p, x):
    """A sorted grouped_mm layer reading its widths from a config object, as benchmark harnesses
    and functional model code do: called with another config, Dynamo makes the changed ints and
    weight sizes symbolic in the graph it compiles next."""
    w, ids = torch.topk(torch.softmax((x @ p["router"].t()).float(), -1), c.k)
    w = w / w.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.histc(flat.float(), bins=c.E, min=0, max=c.E - 1), 0).to(torch.int32)
    tok = order // c.k
    gu = torch._grouped_mm(x[tok], p["gate_up"].transpose(1, 2), offs=offs)
    h = torch.nn.functional.silu(gu[:, :c.F]) * gu[:, c.F:]
    y = torch._grouped_mm(h, p["down"].transpose(1, 2), offs=offs) * w.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros(x.shape[0], c.H, dtype=torch.float32).index_add_(0, tok, y.float()).to(x.dtype)


def test_one_function_at_several_layer_widths_fuses_each():
    """Widths Dynamo made symbolic are specialised (guarded) by moec, tokens stay symbolic: each
    width fuses, and a new token count at a width compiled before does not compile again. Before,
    the third width's graph was reported as split by a graph break (its output width a symbol
    apart from the tokens'), or failed to compile (a symbolic expert count in the probes)."""
    compiled = torch.compile(_grouped_layer, backend="moec", options={"dense_backend": "eager"})
    r = lambda *shape: (torch.randn(*shape) * shape[-1] ** -0.5).to(torch.bfloat16)
    for n, c in enumerate([_Widths(8, 32, 16), _Widths(6, 48, 16), _Widths(4, 40, 24)]):
        p = {"router": r(c.E, c.H), "gate_up": r(c.E, 2 * c.F, c.H), "down": r(c.E, c.H, c.F)}
        for T in (1, 5, 3):
            x = torch.randn(T, c.H, dtype=torch.bfloat16)
            with torch.no_grad():
                got, want = compiled(c, p, x).float(), _grouped_layer(c, p, x).float()
            assert (got - want).norm() <= 2e-2 * want.norm(), (c, T)
        assert counters["moec"]["regions_fused"] == counters["moec"]["graphs"], dict(counters["moec"])
    # 1 + 2 per new width at most (first static, then symbolic); 2.11: a width's first token alone once more
    assert counters["moec"]["graphs"] <= 5 + ONES_APART
