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


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="moec's Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_one_sequence_through_moec_kernels(arch, monkeypatch):
    """One sequence, moec's Triton kernels (interpreted on CPU): the prompt runs the grouped GEMMs, each
    decode step (one token) the GEMV path where the layer is one it takes (Qwen3's small experts; not
    GPT-OSS's, whose gate/up rows are strided along the hidden axis): eager's tokens either way."""
    from moec.codegen import experts_combine_launch, kernels
    calls = []
    real = experts_combine_launch.decode_experts_launch
    monkeypatch.setattr(experts_combine_launch, "decode_experts_launch", lambda *a: calls.append(1) or real(*a))
    model = causal_lm(arch, "grouped_mm")
    prompt = torch.randint(3, 96, (1, 5))
    expected = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    model.forward = torch.compile(model.forward, backend="moec", options={"dense_backend": "eager"})
    with kernels.backend("triton"):
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    assert torch.equal(got, expected)
    layers = model.config.num_hidden_layers
    assert len(calls) == ((NEW_TOKENS - 1) * layers if arch == "qwen3_moe" else 0)
