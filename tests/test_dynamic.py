"""Token counts and routing change every step: at most one recompile for a new batch shape,
none for new routing, and results stay exact at every size."""
import torch
from torch._dynamo.utils import counters

from e2e.hf_models import moe_block


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
    assert counters["moec"]["graphs"] == 2          # one more, with symbolic batch and sequence
    assert counters["moec"]["regions_fused"] == 2   # and it is fused too
    for _ in range(3):                              # new tokens, new routing, same shape
        _run(compiled, block, torch.randn(5, 2, 32, dtype=torch.float64) * 3)
    assert counters["moec"]["graphs"] == 2


def test_zero_tokens_after_compile():
    block = moe_block("mixtral", "batched_mm").double()
    compiled = torch.compile(block, backend="moec", options={"dense_backend": "eager"})
    _run(compiled, block, torch.randn(2, 5, 32, dtype=torch.float64))
    _run(compiled, block, torch.randn(3, 4, 32, dtype=torch.float64))
    out = compiled(torch.randn(0, 4, 32, dtype=torch.float64))
    assert out.shape == (0, 4, 32)
