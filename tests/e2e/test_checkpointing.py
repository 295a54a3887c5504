"""Activation checkpointing: MoE layers inside torch.utils.checkpoint bodies are still found and
fused, and gradients equal eager (HF gradient checkpointing; full and selective checkpoint)."""
import copy
import functools

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import moec
from compare import check_compiled_matches_eager
from hf_models import causal_lm


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_hf_gradient_checkpointing(arch):
    model = causal_lm(arch, "grouped_mm").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokens = torch.randint(3, 96, (2, 7))
    report = moec.explain(model, tokens)
    assert [r.status for r in report.regions] == ["fused"] * model.config.num_hidden_layers, str(report)
    counters.clear()
    check_compiled_matches_eager(model, tokens)
    assert counters["moec"]["regions_fused"] == model.config.num_hidden_layers


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_gradient_checkpointing_with_router_logits(arch):
    # HF's router-logit hooks append to a list inside each checkpointed layer: Dynamo used to drop
    # those layers to eager, unfused and unreported. The aux loss's gradient must reach the router.
    model = causal_lm(arch, "grouped_mm").train()
    model.config.output_router_logits = True
    model.gradient_checkpointing_enable()
    reference = copy.deepcopy(model)
    counters.clear()
    compiled = torch.compile(model.forward, backend="moec", options={"dense_backend": "eager"})
    tokens = torch.randint(3, 96, (2, 7))
    got, expected = compiled(input_ids=tokens, labels=tokens), reference(input_ids=tokens, labels=tokens)
    assert counters["moec"]["regions_fused"] == model.config.num_hidden_layers
    torch.testing.assert_close(got.aux_loss, expected.aux_loss)
    torch.testing.assert_close(got.loss, expected.loss)
    got.loss.backward()
    expected.loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointedLayers(torch.nn.Module):
    """The user's own loop: each decoder layer under torch.utils.checkpoint, full or selective."""

    def __init__(self, model, selective):
        super().__init__()
        self.model, self.selective = model, selective

    def forward(self, tokens):
        inner = self.model.model
        h = inner.embed_tokens(tokens)
        position_ids = torch.arange(tokens.shape[1]).unsqueeze(0)
        rotary = inner.rotary_emb(h, position_ids)
        for layer in inner.layers:
            kwargs = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_matmuls)} \
                if self.selective else {}
            h = checkpoint(layer, h, rotary, None, position_ids, use_reentrant=False, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
        return self.model.lm_head(inner.norm(h))


@pytest.mark.parametrize("selective", [False, True], ids=["full", "selective"])
def test_torch_checkpoint_around_layers(selective):
    module = CheckpointedLayers(causal_lm("mixtral", "batched_mm").train(), selective)
    tokens = torch.randint(3, 96, (2, 7))
    check_compiled_matches_eager(module, tokens)
    assert counters["moec"]["regions_fused"] == 2
