"""LoRA on expert weights: PEFT's `target_parameters` on HF's 3D expert parameters, and a
hand-written W + s * B @ A layer, compiled with moec: one graph, the layer fused, outputs and the
gradient of every LoRA parameter equal to eager, frozen base weights without gradients, and the
merged weight W + s * B @ A never formed (moec.experts reads W and the factors).

LoRA factors are random (`init_lora_weights=False`): PEFT's default B = 0 makes the low-rank
term vanish, which would hide a rewrite that dropped it (the training test starts from the
default and takes optimizer steps, after which B is no longer zero).
"""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import moec
from compare import TOL
from hf_models import moe_block

peft = pytest.importorskip("peft")

OPTIONS = {"dense_backend": "eager"}


def peft_block(arch, impl, dtype, init_lora_weights=False, seed=0):
    """The first MoE block of a tiny HF model with LoRA (r=4, alpha=8) on every 3D expert parameter."""
    block = moe_block(arch, impl, seed).to(dtype)
    names = [f"experts.{n}" for n, p in block.experts.named_parameters() if p.dim() == 3]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=names,
                             init_lora_weights=init_lora_weights)
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(block, config)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def assert_compiled_matches_eager(model, x):
    """Outputs and the gradients of every trainable parameter; frozen parameters get no gradient."""
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="moec", options=OPTIONS)
    out_ref, out = _first(model(x)), _first(compiled(x))
    tol = TOL[out_ref.dtype]
    torch.testing.assert_close(out, out_ref, **tol)
    probe = torch.randn_like(out_ref)
    names = [n for n, _ in _trainable(model)]
    g_ref = torch.autograd.grad((out_ref * probe).sum(), [p for _, p in _trainable(model)])
    g = torch.autograd.grad((out * probe).sum(), [p for _, p in _trainable(compiled_model)])
    for name, a, b in zip(names, g, g_ref):
        assert b.abs().max() > 0, f"control: {name} has a gradient in eager"
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad of {name}: {m}")
    frozen = [(n, p) for n, p in compiled_model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for _, p in frozen)
    return compiled


CASES = [("qwen3_moe", "grouped_mm", torch.float32), ("mixtral", "batched_mm", torch.float64),
         ("gpt_oss", "eager", torch.float64), ("deepseek_v3", "batched_mm", torch.float64)]


@pytest.mark.parametrize("arch,impl,dtype", CASES, ids=[f"{a}-{i}" for a, i, _ in CASES])
def test_peft_target_parameters_fused_and_exact(arch, impl, dtype):
    model = peft_block(arch, impl, dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)
    with model.disable_adapter():
        base_out = _first(model(x))
    assert (_first(model(x)) - base_out).abs().max() > 1e-3, "control: the LoRA term changes the output"
    report = moec.explain(model, x)
    assert report.graph_count == 1 and [r.status for r in report.regions] == ["fused"], str(report)
    assert all("lora_" in n for n, _ in _trainable(model))
    torch._dynamo.reset()    # explain's graph would serve the copy below: compile it afresh
    counters.clear()
    assert_compiled_matches_eager(model, torch.randn(2, 5, 32, dtype=dtype))
    assert counters["moec"]["regions_fused"] == 1 and counters["moec"]["graphs"] == 1


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_peft_lora_on_triton_kernels():
    """The same on moec's Triton kernels (the interpreter on CPU): LoRA's low-rank GEMMs beside
    the grouped ones, forward and backward."""
    pytest.importorskip("triton")
    from moec.codegen import kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = peft_block("qwen3_moe", "grouped_mm", torch.float32).to(device)
    with kernels.backend("triton"):
        assert_compiled_matches_eager(model, torch.randn(2, 5, 32, device=device))
    assert counters["moec"]["regions_fused"] == 1


def test_adamw_steps_match_eager():
    """PEFT's default init (B = 0), three AdamW steps on the LoRA parameters: the losses and the
    parameters after each step equal eager's, and the base weights do not move."""
    model = peft_block("qwen3_moe", "batched_mm", torch.float64, init_lora_weights=True)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="moec", options=OPTIONS)
    base = [p.detach().clone() for p in compiled_model.parameters() if not p.requires_grad]
    opts = [torch.optim.AdamW([p for _, p in _trainable(m)], lr=1e-2) for m in (model, compiled_model)]
    for step in range(3):
        x, target = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
        losses = []
        for m, opt in zip((model, compiled), opts):
            opt.zero_grad()
            loss = F.mse_loss(_first(m(x)), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], **TOL[torch.float64])
        for (name, a), (_, b) in zip(_trainable(compiled_model), _trainable(model)):
            torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"{name} after step {step}: {m}")
    assert counters["moec"]["regions_fused"] == 1
    assert all(torch.equal(a, b) for a, b in zip(base, [p for p in compiled_model.parameters() if not p.requires_grad]))
    assert any(b.abs().max() > 0 for n, b in _trainable(compiled_model) if "lora_B" in n), "B left zero"


class LoraExpertsMoE(nn.Module):
    """A hand-written MoE layer with LoRA on its stacked expert weights: W + s * (B @ A) per
    expert, as `W + bmm(B, A) * s` (an add, not PEFT's baddbmm), looped over range(E)."""

    def __init__(self, hidden=32, ffn=16, experts=4, top_k=2, r=3, scale=1.5):
        super().__init__()
        self.k, self.E, self.s = top_k, experts, scale
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, 2 * ffn, hidden) / hidden ** 0.5, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, ffn) / ffn ** 0.5, requires_grad=False)
        self.a1 = nn.Parameter(torch.randn(experts, r, hidden) / hidden ** 0.5)
        self.b1 = nn.Parameter(torch.randn(experts, 2 * ffn, r) / r ** 0.5)
        self.a2 = nn.Parameter(torch.randn(experts, r, ffn) / ffn ** 0.5)
        self.b2 = nn.Parameter(torch.randn(experts, hidden, r) / r ** 0.5)

    def forward(self, x):                                             # (T, H)
        w, ids = torch.topk(F.softmax(self.gate(x), dim=-1), self.k, dim=-1)
        w1 = self.w1 + torch.bmm(self.b1, self.a1) * self.s           # (E, 2F, H)
        w2 = self.w2 + torch.bmm(self.b2, self.a2) * self.s           # (E, H, F)
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = torch.where(ids == e)
            g, u = F.linear(x[tok], w1[e]).chunk(2, dim=-1)
            out.index_add_(0, tok, F.linear(F.silu(g) * u, w2[e]) * w[tok, slot, None])
        return out


def test_hand_written_lora_experts():
    torch.manual_seed(0)
    model = LoraExpertsMoE().double()
    model.gate.weight.requires_grad_(False)
    x = torch.randn(12, 32, dtype=torch.float64)
    report = moec.explain(model, x)
    assert [r.status for r in report.regions] == ["fused"], str(report)
    torch._dynamo.reset()
    counters.clear()
    assert_compiled_matches_eager(model, x)
    assert counters["moec"]["regions_fused"] == 1



def test_training_lora_layer_keeps_its_preactivations():
    """In training the LoRA layer's experts and combine become moec.experts_combine keeping u | g
    (LoRA terms in them; the backward recomputes no GEMM); under no_grad, keeping nothing.
    Values and gradients as eager in float64."""
    from moec import session
    torch.manual_seed(0)
    model = LoraExpertsMoE().double()
    x = torch.randn(12, 32, dtype=torch.float64)
    session.clear()
    assert_compiled_matches_eager(model, x)
    reports = [r.reports["fuse_combine"] for r in session.take() if "fuse_combine" in r.reports]
    assert [save for rep in reports for _, save in rep.fused] == [True], reports
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="moec", options=OPTIONS)(x)
    [report] = [r.reports["fuse_combine"] for r in session.take() if "fuse_combine" in r.reports]
    assert [save for _, save in report.fused] == [False] and not report.kept, report


class _Shapes(TorchDispatchMode):
    """Records each op's name and the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((str(func), [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]))
        return out


def _backward_recorded(module, x):
    # the forward outside the mode: Dynamo runs compiled code only while no dispatch mode is on
    out = _first(module(x))
    with _Shapes() as mode:
        (out * torch.randn_like(out)).sum().backward()
    return mode.calls


@pytest.mark.parametrize("arch,impl", [("qwen3_moe", "grouped_mm"), ("gpt_oss", "eager")])
def test_merged_weight_never_formed(tmp_path, arch, impl):
    """The rewritten graph reads W and the LoRA factors, not W + s * B @ A, and its backward makes
    no tensor of a base weight's shape: no merged weight, no copy of W, no gradient for the
    frozen W. Eager PEFT's backward, the positive control, does (the merged weight's gradient)."""
    model = peft_block(arch, impl, torch.float32)
    bases = {tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 3}
    assert any(bases & set(shapes) for _, shapes in _backward_recorded(model, torch.randn(2, 5, 32))), "control"
    compiled = torch.compile(model, backend="moec", options={**OPTIONS, "dump_dir": str(tmp_path)})
    x = torch.randn(2, 5, 32)
    compiled(x)                                           # compile outside the recorded run
    [folder] = os.listdir(tmp_path)
    before, after = (open(os.path.join(tmp_path, folder, f)).read() for f in ("00_input.py", "02_rewrite.py"))
    assert "baddbmm" in before and "baddbmm" not in after
    assert all(f"lora_{f}_{p}=" in after for f in "ab" for p in ("up", "gate", "down"))
    calls = _backward_recorded(compiled, x)
    assert not [c for c in calls if bases & set(c[1])], [c for c in calls if bases & set(c[1])]
    backward = [shapes for name, shapes in calls if "experts_combine_backward" in name]   # fused with the combine
    assert backward and all((0,) in shapes for shapes in backward)   # the frozen bases' empty slots


def test_hand_written_lora_graph_drops_the_delta(tmp_path):
    """`W + bmm(B, A) * s`: the add, the bmm and the scaling all leave the rewritten graph."""
    torch.manual_seed(0)
    model = LoraExpertsMoE()
    torch.compile(model, backend="moec", options={**OPTIONS, "dump_dir": str(tmp_path)})(torch.randn(12, 32))
    [folder] = os.listdir(tmp_path)
    before, after = (open(os.path.join(tmp_path, folder, f)).read() for f in ("00_input.py", "02_rewrite.py"))
    assert "torch.bmm" in before and "torch.bmm" not in after and "lora_a_up=" in after


class _Expert(nn.Module):
    def __init__(self, hidden=32, ffn=16):
        super().__init__()
        self.w1, self.w3 = nn.Linear(hidden, ffn, bias=False), nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ModuleListMoE(nn.Module):
    """Experts as an nn.ModuleList of per-expert Linear layers (Mixtral's original style)."""

    def __init__(self, hidden=32, experts=4, top_k=2):
        super().__init__()
        self.k, self.E = top_k, experts
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(_Expert(hidden) for _ in range(experts))

    def forward(self, x):                                             # (T, H)
        w, ids = torch.topk(F.softmax(self.gate(x), dim=-1), self.k, dim=-1)
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out


def test_lora_on_per_expert_linear_is_a_named_miss():
    """PEFT's target_modules on per-expert nn.Linear: Dynamo unrolls every expert and its adapter.
    moec's kernels read stacked weights (stacking would copy the frozen weights every step), so it
    is a miss whose reason names the adapters and the fix; the unfused layer still equals eager."""
    torch.manual_seed(0)
    model = peft.get_peft_model(ModuleListMoE().double(), peft.LoraConfig(
        r=4, target_modules=["w1", "w2", "w3"], init_lora_weights=False))
    x = torch.randn(12, 32, dtype=torch.float64)
    report = moec.explain(model, x)
    [region] = report.regions
    assert region.status == "missed" and region.module == "base_model.model", str(report)
    assert "separate modules" in region.reason and "target_parameters" in region.reason
    torch._dynamo.reset()
    counters.clear()
    assert_compiled_matches_eager(model, x)
    assert counters["moec"]["regions_missed_unproven"] == 1 and counters["moec"]["regions_fused"] == 0


def test_adapter_states_and_eager_calls_keep_peft_semantics():
    """Disabling the adapter inside a compiled call gives the base model's output (PEFT's own
    forward runs, and the layer is fused without LoRA), and PEFT's ParamWrapper is its own again
    outside compiled calls."""
    from peft.tuners.lora.layer import ParamWrapper
    original = ParamWrapper.forward
    model = peft_block("mixtral", "batched_mm", torch.float64)
    compiled = torch.compile(model, backend="moec", options=OPTIONS)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(_first(compiled(x)), _first(model(x)), **TOL[torch.float64])
    with model.disable_adapter():
        base = _first(model(x))
        torch.testing.assert_close(_first(compiled(x)), base, **TOL[torch.float64])
    assert (_first(model(x)) - base).abs().max() > 1e-3
    assert ParamWrapper.forward is original
    assert counters["moec"]["regions_fused"] == 2
