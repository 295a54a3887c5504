"""Every Hugging Face MoE architecture x experts implementation: found, fused, exact.

Each block is built from a tiny random config, compiled with backend="moec" (dense parts left
to the "eager" backend to keep CI fast; Inductor is covered in test_hf_causal_lm), and compared
with eager PyTorch in float64: outputs and the gradients of the input and of every parameter.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import moec
from compare import check_compiled_matches_eager
from hf_models import ARCHS, moe_block, switch_model

ROUTER = {"mixtral": "softmax_topk", "qwen3_moe": "softmax_topk", "olmoe": "softmax_topk",
          "deepseek_v3": "sigmoid_bias_grouped", "gpt_oss": "topk_softmax"}
CASES = [(arch, impl) for arch, spec in ARCHS.items() for impl in spec[3]]


@pytest.mark.parametrize("arch,impl", CASES, ids=[f"{a}-{i}" for a, i in CASES])
def test_block_fused_and_exact(arch, impl):
    # float64 for a sharp comparison, except where HF's eager grouped_mm path has no float64 kernel.
    dtype = torch.float32 if impl == "grouped_mm" else torch.float64
    block = moe_block(arch, impl).to(dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)
    report = moec.explain(block, x)
    assert report.graph_count == 1, str(report)
    [region] = report.regions
    assert region.status == "fused", str(report)
    assert (region.router, region.top_k) == (ROUTER[arch], ARCHS[arch][0]().num_experts_per_tok)
    expected_idiom = {"eager": "hf_eager_loop (traced as grouped_mm)", "batched_mm": "batched_mm",
                      "grouped_mm": "grouped_mm"}[impl]
    assert region.idiom == expected_idiom

    counters.clear()
    check_compiled_matches_eager(block, torch.randn(2, 5, 32, dtype=dtype))
    assert counters["moec"]["regions_fused"] == 1


def test_eager_loop_without_swap_is_a_reported_miss(monkeypatch):
    """With the HF swap off, the data-dependent loop graph-breaks: a miss naming the break and the fix."""
    monkeypatch.setenv("MOEC_HF_EAGER_EXPERTS_AS", "")
    report = moec.explain(moe_block("mixtral", "eager"), torch.randn(2, 5, 32))
    assert report.graph_count > 1
    [region] = report.regions
    assert region.status == "missed"
    assert "set_experts_implementation" in region.reason and "modeling_mixtral.py" in region.where
    assert any("modeling_mixtral.py" in where for _, where in report.graph_breaks)


def test_switch_transformers_is_a_reported_miss_with_correct_result():
    """Switch picks each expert's nn.Module by a data-dependent index inside a loop over the experts
    that received tokens: no graph can hold the layer. moec reports it, names the break, and the
    compiled model (the layer unfused) still equals eager."""
    model = switch_model()
    block = model.encoder.block[1].layer[-1].mlp
    x = torch.randn(2, 6, 32)
    report = moec.explain(block, x)
    [region] = report.regions
    assert (region.status, region.num_experts, region.top_k) == ("missed", 4, 1)
    assert "graph break" in region.reason and "modeling_switch_transformers.py" in region.where
    compiled = torch.compile(block, backend="moec", options={"dense_backend": "eager"})
    torch.testing.assert_close(compiled(x), block(x))
    assert counters["moec"]["regions_fused"] == 0 and counters["moec"]["regions_missed_graph_break"] >= 1


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_router_fused_into_the_routing_launch(monkeypatch, arch):
    """MOEC_ROUTER_PLAN=1 (passes/fuse_router.py): each architecture's router (Qwen3's F.linear,
    DeepSeek-V3's in float32 with a score bias, GPT-OSS's with a bias) joins route_plan, exact.
    float32: in a float64 model, softmax(logits, dtype=float32) puts a cast between the two."""
    from moec import session
    from moec.codegen import router_plan_op
    monkeypatch.setattr(router_plan_op, "ENABLED", True)
    block = moe_block(arch, "batched_mm")
    session.clear()
    torch.compile(block, backend="moec", options={"dense_backend": "eager"})(torch.randn(2, 5, 32))
    [record] = session.take()
    assert len(record.reports["fuse_router"].fused) == 1
    check_compiled_matches_eager(block, torch.randn(2, 5, 32))
