"""Whole tiny `*ForCausalLM` models: every layer's MoE block is found and fused, and the
compiled model (dense parts through Inductor) equals eager PyTorch, logits and gradients."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import moec
from compare import check_compiled_matches_eager
from hf_models import ARCHS, causal_lm


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_layer_fused(arch):
    model = causal_lm(arch, "eager")
    report = moec.explain(model, torch.randint(3, 96, (2, 7)))
    assert report.graph_count == 1, str(report)
    assert [(r.module, r.status) for r in report.regions] == \
        [(f"model.layers.{i}.mlp", "fused") for i in range(model.config.num_hidden_layers)], str(report)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_inductor_matches_eager(arch):
    model = causal_lm(arch, "grouped_mm")
    check_compiled_matches_eager(model, torch.randint(3, 96, (2, 7)), dense_backend="inductor")
    assert counters["moec"]["regions_fused"] == model.config.num_hidden_layers


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_models_fused(arch):
    """bf16, the dtype models train and serve in: the proof runs the layer in float64 but the
    user's code rounds to bf16 inside it, and must still be recognised (found on an H100)."""
    model = causal_lm(arch, "batched_mm").to(torch.bfloat16)
    tokens = torch.randint(3, 96, (2, 7))
    report = moec.explain(model, tokens)
    assert [r.status for r in report.regions] == ["fused"] * model.config.num_hidden_layers, str(report)
    if arch == "qwen3_moe":
        # bf16 rounding differs between any two orders of the same sums: compare the logits
        # elementwise and each gradient by its norm. Reset: the copy would reuse explain's graph.
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(copy.deepcopy(model), backend="moec", options={"dense_backend": "eager"})
        out, ref = compiled(tokens).logits, model(tokens).logits
        torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)
        probe = torch.randn_like(ref)
        (out.float() * probe).sum().backward()
        (ref.float() * probe).sum().backward()
        for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
            err = ((q.grad.float() - p.grad.float()).norm() / p.grad.float().norm().clamp_min(1e-12)).item()
            assert err < 3e-2, (name, err)
        assert counters["moec"]["regions_fused"] == model.config.num_hidden_layers
