"""Serving: greedy `generate()` with a static KV cache on a compiled forward gives eager's
tokens, with two compiles (prefill and decode) and none per new token."""
import pytest
import torch
from torch._dynamo.utils import counters

from hf_models import causal_lm

NEW_TOKENS = 6


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_greedy_generate_matches_eager(arch):
    model = causal_lm(arch, "grouped_mm")
    prompt = torch.randint(3, 96, (2, 5))
    expected = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    model.forward = torch.compile(model.forward, backend="moec", options={"dense_backend": "eager"})
    got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    assert torch.equal(got, expected)
    # one graph for the prompt, one for every decode step after it; each with both MoE layers fused
    assert counters["moec"]["graphs"] == 2
    assert counters["moec"]["regions_fused"] == 2 * model.config.num_hidden_layers
