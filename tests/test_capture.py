"""moec's tracing context: dynamic-output capture is on only while moec traces; a split by host-side
counts (`bincount(...).tolist()`, which raised in Dynamo under that setting) graph-breaks at the
`.tolist()` and is reported; MOEC_CAPTURE_DYNAMIC=0 traces Dynamo's default way.
HF's eager experts loop, traced as grouped_mm, compiles once, not once per call. The config
switches are entered only while Dynamo compiles (its compile callbacks), not on every call."""
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moec
from compare import check_compiled_matches_eager

sys.path.insert(0, str(Path(__file__).parent / "e2e"))


class SplitByCountsMoE(nn.Module):
    """torchtitan's early for-loop experts: sort copies by expert, split by host-side counts."""

    def __init__(self, hidden=16, ffn=8, experts=4, top_k=2):
        super().__init__()
        self.k, self.E = top_k, experts
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, ffn, hidden) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, ffn) / ffn ** 0.5)

    def forward(self, x):                                             # (T, H)
        w, ids = torch.topk(F.softmax(self.gate(x), dim=-1), self.k)
        order = ids.reshape(-1).argsort(stable=True)
        counts = torch.bincount(ids.reshape(-1), minlength=self.E).tolist()
        chunks = torch.split(x[order // self.k], counts)
        y = torch.cat([F.relu(c @ self.w1[e].t()) @ self.w2[e].t() for e, c in enumerate(chunks)])
        return torch.zeros_like(x).index_add(0, order // self.k, y * w.reshape(-1)[order, None])


def test_split_by_host_counts_breaks_and_is_reported():
    """torchtitan's for-loop experts under moec: a graph break at `.tolist()` (not Dynamo's
    GuardOnDataDependentSymNode), values and gradients equal eager's, and the layer is reported
    missed with the break's reason and a fix."""
    torch.manual_seed(0)
    module = SplitByCountsMoE().double()
    report = moec.explain(module, torch.randn(6, 16, dtype=torch.float64))
    assert [r.status for r in report.regions] == ["missed"], str(report)
    assert "reads per-expert sizes on the host" in report.regions[0].reason, str(report)
    assert any(reason.startswith("moec: .tolist()") for reason, _ in report.graph_breaks), str(report)
    check_compiled_matches_eager(module, torch.randn(6, 16, dtype=torch.float64))


def test_capture_off_traces_the_default_way(monkeypatch):
    monkeypatch.setenv("MOEC_CAPTURE_DYNAMIC", "0")
    torch.manual_seed(0)
    module = SplitByCountsMoE().double()
    report = moec.explain(module, torch.randn(6, 16, dtype=torch.float64))
    assert report.graph_count > 1 and [r.status for r in report.regions] == ["missed"]
    check_compiled_matches_eager(module, torch.randn(6, 16, dtype=torch.float64))


def test_other_backends_keep_dynamo_defaults():
    """The capture flags apply while moec traces; plain torch.compile still graph-breaks and runs."""
    torch.manual_seed(0)
    module = SplitByCountsMoE()
    x = torch.randn(6, 16)
    torch.testing.assert_close(torch.compile(module, backend="eager")(x), module(x))
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops


def test_hf_eager_experts_compile_once():
    """The traced-as wrapper is one object per implementation: a fresh one per call of the compiled
    function failed Dynamo's guard on its code and recompiled every training step."""
    from hf_models import moe_block
    compiled = torch.compile(moe_block("qwen3_moe", "eager"), backend="moec", options={"dense_backend": "eager"})
    for seed in range(3):
        compiled(torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed)))
    assert counters["moec"]["graphs"] == 1 and counters["moec"]["regions_fused"] == 1


def test_config_switches_only_while_compiling(monkeypatch):
    """On while moec's backend runs (inside Dynamo's compile), off on cache hits and after."""
    import moec.backend
    from moec import capture
    seen, real = [], moec.backend.run_pipeline

    def spy(*args, **kwargs):
        seen.append(torch._dynamo.config.capture_dynamic_output_shape_ops)
        return real(*args, **kwargs)
    monkeypatch.setattr(moec.backend, "run_pipeline", spy)
    compiled = torch.compile(lambda x: x * 2, backend="moec")
    x = torch.randn(3)
    torch.testing.assert_close(compiled(x), x * 2)
    compiled(x)       # a cache hit: nothing traced, the switches never entered
    assert seen == [True] and not torch._dynamo.config.capture_dynamic_output_shape_ops
    assert capture._open["stack"] is None and capture._marks.depth == 0
    torch._dynamo.reset()       # clears Dynamo's callbacks: moec registers its own again
    compiled(torch.randn(4, 2))
    assert seen == [True, True] and not torch._dynamo.config.capture_dynamic_output_shape_ops
