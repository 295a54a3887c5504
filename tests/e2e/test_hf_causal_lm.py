"""Whole tiny `*ForCausalLM` models: every layer's MoE block is found and fused, and the
compiled model (dense parts through Inductor) equals eager PyTorch, logits and gradients."""
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
