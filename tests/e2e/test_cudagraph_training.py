"""Training under mode="reduce-overhead": Inductor's CUDA graph trees replay moec's forward and
backward (the remedy where a step is host-bound), with fresh inputs each step, and give the
gradients the same compiled graph gives without CUDA graphs, bit for bit. GPU only: on the CPU
Inductor records no CUDA graph and the test would prove nothing."""
import pytest
import torch
from torch._dynamo.utils import counters

from hf_models import moe_block

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _grads(fn, block, x):
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    leaves = [x] + [p for p in block.parameters() if p.requires_grad]
    return [out.detach().clone()] + [g.clone() for g in torch.autograd.grad(out.float().square().sum(), leaves)]


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_training_steps_replayed_match(arch):
    torch._dynamo.reset()
    block = moe_block(arch, "grouped_mm").cuda().to(torch.bfloat16).train()
    counters.clear()
    plain = torch.compile(block, backend="moec")
    graphed = torch.compile(block, backend="moec", mode="reduce-overhead")
    for step in range(4):      # the first steps record; later ones replay, each with new inputs
        x = torch.randn(2, 8, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.compiler.cudagraph_mark_step_begin()
        got = _grads(graphed, block, x)
        want = _grads(plain, block, x)
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"step {step}"
    assert counters["moec"]["regions_fused"] >= 2
    assert counters["inductor"]["cudagraph_skips"] == 0
