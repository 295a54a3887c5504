"""Token-count buckets (passes/token_buckets.py, moec/buckets.py): a dynamic graph runs on its
token count padded to the next power of two, so CUDA graphs are captured per bucket; only where
each output row depends on its own input rows alone, else the reason. On the CPU with "always"
(CUDA graphs are what "auto" waits for); the padded sizes are seen by the dense backend."""
import os

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import moec  # noqa: F401  (registers the backend)
from moec import session
from moec.errors import MoecError
from moe_idioms import MaskLoopMoE


class _Block(nn.Module):
    """norm -> MoE -> residual, plus an optional op that mixes tokens or writes an input."""

    def __init__(self, mix=None):
        super().__init__()
        self.norm, self.moe, self.mix = nn.LayerNorm(32), MaskLoopMoE(), mix

    def forward(self, x, cache=None):
        y = x + self.moe(self.norm(x))
        if self.mix == "mean":
            y = y - y.mean(0, keepdim=True)       # every row reads every token
        if self.mix == "cache":
            cache[: x.shape[0]] = y.detach()      # an input written in place
        return y


class _SeqBlock(nn.Module):
    """Hugging Face's block shape: (batch, seq, hidden) flattened for the MoE, reshaped back to the
    input's batch size (a symbolic size in the graph)."""

    def __init__(self):
        super().__init__()
        self.norm, self.moe = nn.LayerNorm(32), MaskLoopMoE()

    def forward(self, x):
        b, s, h = x.shape
        return x + self.moe(self.norm(x).view(-1, h)).reshape(b, s, h)


def _recording_backend(seen):
    def backend(gm, example_inputs):
        def run(*args):
            seen.append(tuple(a.shape[0] for a in args if isinstance(a, torch.Tensor) and not a.requires_grad
                              and a.dim() >= 2 and a.shape[-1] == 32))    # activations, not weights
            return gm(*args)
        return run
    return backend


def _run(model, counts, seen, **options):
    compiled = torch.compile(model, backend="moec", options={"dense_backend": _recording_backend(seen),
                                                             "token_buckets": "always", **options})
    with torch.no_grad():
        for T in counts:
            x = torch.randn(T, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("router_plan", [False, True], ids=["route_plan", "router_plan"])
def test_counts_within_a_bucket_reuse_one_padded_shape(monkeypatch, router_plan):
    """Also with the router's linear layer inside the routing op (MOEC_ROUTER_PLAN=1)."""
    from moec.codegen import router_plan_op
    monkeypatch.setattr(router_plan_op, "ENABLED", router_plan)
    torch.manual_seed(0)
    seen, model = [], _Block()
    session.clear()
    _run(model, [3], seen)                            # the first call compiles for T = 3 alone
    static_calls = len(seen)
    _run(model, [5, 6, 7, 8], seen)
    assert counters["moec"]["graphs"] == 2            # then one dynamic graph for every count
    assert [len(r.reports["fuse_router"].fused) for r in session.take()] == [int(router_plan)] * 2
    assert counters["moec"]["token_buckets"] == 1
    # the dynamic graph ran its dense partitions on 8 rows for 5 to 8 tokens
    assert {rows for call in seen[static_calls:] for rows in call} == {8}, seen


def test_reshape_to_the_batch_size_is_bucketed():
    torch.manual_seed(0)
    seen, model = [], _SeqBlock()
    compiled = torch.compile(model, backend="moec", options={"dense_backend": _recording_backend(seen),
                                                             "token_buckets": "always"})
    static_calls = 0
    with torch.no_grad():
        for T in (3, 5, 7):
            x = torch.randn(T, 1, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=2e-4, atol=2e-5)
            static_calls = static_calls or len(seen)      # the first call compiles for T = 3 alone
    assert counters["moec"]["token_buckets"] == 1
    assert {rows for call in seen[static_calls:] for rows in call} == {8}, seen


@pytest.mark.parametrize("mix,why", [("mean", "mixes tokens"), ("cache", "written in place")])
def test_graphs_that_mix_tokens_are_not_bucketed(mix, why):
    torch.manual_seed(0)
    seen, model = [], _Block(mix)
    compiled = torch.compile(model, backend="moec", options={"dense_backend": _recording_backend(seen),
                                                             "token_buckets": "always"})
    cache_a, cache_b = torch.zeros(16, 32), torch.zeros(16, 32)
    with torch.no_grad():
        for T in (3, 5, 6):
            x = torch.randn(T, 32)
            torch.testing.assert_close(compiled(x, cache_a), model(x, cache_b), rtol=2e-4, atol=2e-5)
    assert counters["moec"]["token_buckets"] == 0
    reports = [r.reports["token_buckets"] for r in session.take() if "token_buckets" in r.reports]
    assert any(why in r.why or "token-local" in r.why for r in reports), [r.why for r in reports]
    assert all(rows != 8 for call in seen for rows in call)


def test_auto_waits_for_cuda_graphs():
    torch.manual_seed(0)
    seen = []
    _run(_Block(), [3, 5, 6], seen, token_buckets="auto")
    assert counters["moec"]["token_buckets"] == 0


def test_unknown_setting_is_refused():
    with pytest.raises(MoecError, match="token_buckets"):
        moec.config.Config.from_options({"token_buckets": "sometimes"})


def test_dump_says_which_graph_is_bucketed(tmp_path):
    torch.manual_seed(0)
    _run(_Block(), [3, 5], [], dump_dir=str(tmp_path))
    notes = [open(os.path.join(tmp_path, d, "cudagraphs.txt")).read() for d in os.listdir(tmp_path)
             if os.path.exists(os.path.join(tmp_path, d, "cudagraphs.txt"))]
    assert len(notes) == 1 and notes[0].startswith("token buckets: token counts bucketed"), notes
