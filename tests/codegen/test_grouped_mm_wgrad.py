"""dW_down through torch._grouped_mm (codegen/grouped_mm_wgrad.py) against float64: both
orientations of the down base, a trained b_down, experts with no rows, a dropped copy, every copy
on one expert; and where it must not be taken (moec's kernel then). On the CPU the path runs on
torch's fallback of `_grouped_mm` (ANY_DEVICE); on an sm90 card on CUTLASS's kernel."""
from types import SimpleNamespace

import pytest
import torch

from moec.codegen import grouped_mm_wgrad, kernels, reference, wgrad_kernel
from moec.codegen import layout as layouts

from kernel_helpers import DEVICE, record_calls, rel_err
from test_experts_launch import _routing

OPS = torch.ops.moec
E, k, H, F = 4, 2, 24, 16


@pytest.fixture
def taken(monkeypatch):
    monkeypatch.setattr(grouped_mm_wgrad, "ANY_DEVICE", True)
    monkeypatch.setattr(grouped_mm_wgrad, "ENABLED", True)
    return record_calls(monkeypatch, grouped_mm_wgrad, "down_wgrad")


def _layer(transposed, bias, dtype=torch.bfloat16):
    w = lambda *s: (torch.randn(*s, device=DEVICE) * s[-1] ** -0.5).to(dtype)     # noqa: E731
    gate_up = (w(E, 2 * F, H), False, None)
    down = (w(E, F, H), True, None) if transposed else (w(E, H, F), False, None)
    up, gate = (gate_up[0], False, (F, 1, None)), (gate_up[0], False, (0, 1, F))
    return layouts.pack([up, gate, down, None, None, (w(E, H), False, None) if bias else None])


@pytest.mark.parametrize("transposed,bias", [(False, False), (True, True)])
@pytest.mark.parametrize("how", ["uniform", "sparse", "one_expert"])
def test_down_weight_gradient_through_grouped_mm(taken, transposed, bias, how):
    T = 9
    offsets, src, inv = _routing(T, E, k, how)
    bases, layout = _layer(transposed, bias)
    go = torch.randn(T, H, device=DEVICE).to(torch.bfloat16)
    hw = torch.randn(T * k, F, device=DEVICE).to(torch.bfloat16)
    route_w = torch.rand(T, k, device=DEVICE).to(torch.bfloat16)
    needs = [False, True] + [True] * bias
    with kernels.backend("triton"):
        got = OPS.experts_down_wgrad(go, hw, src, offsets, route_w, k, bases, layout, needs)
    assert taken, "the grouped_mm path was not taken"
    d = lambda t: t.cpu().double()      # noqa: E731
    want = reference.down_weight_grads(d(go), d(hw), src.cpu(), offsets.cpu(), k, d(route_w), [d(b) for b in bases],
                                       layout, needs)
    for i in (1, 2) if bias else (1,):
        assert got[i].shape == bases[i].shape and got[i].is_contiguous()
        assert rel_err(got[i].cpu(), want[i]) < 1e-2, i
    empty = (offsets[1:] == offsets[:-1]).cpu()
    assert torch.equal(got[1].cpu()[empty], torch.zeros_like(got[1].cpu()[empty]))    # no rows: zeros


def test_where_the_grouped_mm_path_is_not_taken(taken, monkeypatch):
    bases, layout = _layer(False, False)
    hw = torch.randn(6, F, device=DEVICE).to(torch.bfloat16)
    assert grouped_mm_wgrad.whole_base(hw, bases, layout, [True, True]) == (1, False)
    assert grouped_mm_wgrad.whole_base(hw.float(), bases, layout, [True, True]) is None          # bf16 only
    assert grouped_mm_wgrad.whole_base(hw, bases, layout, [True, False]) is None                 # down frozen
    sliced = layout.replace("w_down=1", "w_down=1[0:8:1]")
    assert grouped_mm_wgrad.whole_base(hw, bases, sliced, [True, True]) is None                  # part of a base
    shared = layouts.pack([(bases[0], False, (F, 1, None)), None, (bases[0], True, (0, 1, F))])[1]
    assert grouped_mm_wgrad.whole_base(hw, bases[:1], shared, [True]) is None                   # base read twice
    odd = [bases[0], bases[1].transpose(1, 2).contiguous().transpose(1, 2)]
    assert grouped_mm_wgrad.whole_base(hw, odd, layout, [True, True]) is None                    # not contiguous
    monkeypatch.setattr(wgrad_kernel, "MAX_COPY_BYTES", 1 << 20)
    assert grouped_mm_wgrad.whole_base(hw, bases, layout, [True, True]) is None                  # chunked copies
    monkeypatch.setattr(wgrad_kernel, "MAX_COPY_BYTES", wgrad_kernel._ONE_COPY_MIB << 20)
    monkeypatch.setattr(grouped_mm_wgrad, "ENABLED", False)
    assert grouped_mm_wgrad.whole_base(hw, bases, layout, [True, True]) is None                  # switched off


def _joint_layer(transposed, gate_first):
    """HF's fused gate_up (E, 2F, H) (or its transpose (E, H, 2F)) with gate's half first or up's, and
    a down base; every base contiguous."""
    w = lambda *s: (torch.randn(*s, device=DEVICE) * s[-1] ** -0.5).to(torch.bfloat16)     # noqa: E731
    gu = w(E, H, 2 * F) if transposed else w(E, 2 * F, H)
    g0, u0 = (0, F) if gate_first else (F, 0)
    up, gate = (gu, transposed, (u0, 1, u0 + F)), (gu, transposed, (g0, 1, g0 + F))
    return layouts.pack([up, gate, (w(E, H, F), False, None), None, None, None])


ARGS = ("silu", 1.702, 7.0)


def _d(t):
    return t.detach().cpu().double()


def train_combine(bases, layout, how, T=9):
    """experts_combine (saving pre) and its backward on the Triton path, bases made leaves, fresh bf16
    x and routing weights, routing `how` (test_experts_launch._routing): -> the run's tensors, with
    routing64 the reference's routing arguments."""
    offsets, src, inv = _routing(T, E, k, how)
    x = torch.randn(T, H, device=DEVICE).to(torch.bfloat16).requires_grad_()
    route_w = torch.rand(T, k, device=DEVICE).requires_grad_()
    for b in bases:
        b.requires_grad_()
    with kernels.backend("triton"):
        out, pre = OPS.experts_combine(x, src, offsets, inv, route_w, k, bases, layout, *ARGS, True)
        gout = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, route_w] + bases, gout)
    return SimpleNamespace(offsets=offsets, x=x, out=out, pre=pre, gout=gout, grads=grads,
                           routing64=(src.cpu(), offsets.cpu(), inv.cpu(), _d(route_w), k))


def assert_combine_grads(run, bases, layout):
    """dx, the routing weights' and every weight's gradient of `train_combine`'s run against float64."""
    want = reference.experts_combine_backward(_d(run.gout), _d(run.x), *run.routing64, [_d(b) for b in bases],
                                              layout, *ARGS)
    for i, (g, w) in enumerate(zip(run.grads, want)):
        assert g.shape == w.shape, i
        assert rel_err(g.cpu(), w) < 2e-2, i


@pytest.fixture
def joint(monkeypatch):
    monkeypatch.setattr(grouped_mm_wgrad, "ANY_DEVICE", True)
    monkeypatch.setattr(grouped_mm_wgrad, "ENABLED", True)
    return record_calls(monkeypatch, grouped_mm_wgrad, "gate_up_wgrad", "input_rows", "down_wgrad")


@pytest.mark.parametrize("transposed,gate_first", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("how", ["uniform", "sparse", "one_expert"])
def test_backward_with_gate_and_up_side_by_side(joint, transposed, gate_first, how):
    """experts_combine's backward as compiled graphs run it (three ops): du and dg written into one
    (S, 2F) buffer in the base's order, the input gradient's rows and the gate/up base's gradient
    through `_grouped_mm`, against float64: dx, the routing weights' gradient, every weight's;
    experts without rows, a dropped copy (its rows zeroed), every copy on one expert."""
    bases, layout = _joint_layer(transposed, gate_first)
    run = train_combine(bases, layout, how)
    assert sorted(set(joint)) == ["down_wgrad", "gate_up_wgrad", "input_rows"], joint
    assert_combine_grads(run, bases, layout)
    empty = (run.offsets[1:] == run.offsets[:-1]).cpu()
    gu = run.grads[2].cpu().transpose(1, 2) if transposed else run.grads[2].cpu()
    assert torch.equal(gu[empty], torch.zeros_like(gu[empty]))      # experts without rows: zeros


def test_where_gate_and_up_do_not_go_side_by_side(joint):
    bases, layout = _joint_layer(False, True)
    x = torch.randn(6, H, device=DEVICE).to(torch.bfloat16)
    assert grouped_mm_wgrad.joint_gate_up(x, bases, layout) == (0, False, 0, F)
    assert grouped_mm_wgrad.joint_gate_up(x.float(), bases, layout) is None                 # bf16 only
    assert grouped_mm_wgrad.joint_gate_up(x, *_layer(False, True)) == (0, False, 0, F)     # b_down beside: taken
    interleaved = layouts.pack([(bases[0], False, (1, 2, None)), (bases[0], False, (0, 2, None)),
                                (bases[1], False, None)])[1]
    assert grouped_mm_wgrad.joint_gate_up(x, bases, interleaved) is None                    # GPT-OSS's order
    apart = layouts.pack([(bases[0][:, F:], False, None), (bases[0][:, :F].contiguous(), False, None),
                          (bases[1], False, None)])
    assert grouped_mm_wgrad.joint_gate_up(x, *apart) is None                                # two bases
    half = layouts.pack([(bases[0], False, (0, 1, F // 2)), (bases[0], False, (F, 1, 2 * F)),
                         (bases[1], False, None)])[1]
    assert grouped_mm_wgrad.joint_gate_up(x, bases, half) is None                           # not the whole base


@pytest.mark.parametrize("forward", [False, True])
def test_compiled_hf_block_with_the_grouped_mm_backward(joint, monkeypatch, forward):
    """A Hugging Face Qwen3-MoE block compiled with moec (Inductor around it), bf16, trained through the
    CUTLASS GEMMs: the compiled graph was traced with the rows op's dgu (its fake says so, or Inductor's
    size asserts would fail); output and every gradient against the float64 eager block. forward: the
    forward's GEMMs through it too (grouped_mm_forward.py: pre saved in the base's column order)."""
    from e2e.hf_models import moe_block
    from moec.codegen import grouped_mm_forward
    monkeypatch.setattr(grouped_mm_forward, "GATE_UP", forward)
    monkeypatch.setattr(grouped_mm_forward, "DOWN", forward)
    forward_calls = record_calls(monkeypatch, grouped_mm_forward, "gate_up_rows", "down_rows")
    ref = moe_block("qwen3_moe", "eager").double()      # the same weights; grouped_mm has no float64
    block = moe_block("qwen3_moe", "grouped_mm").to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    with kernels.backend("triton"):
        compiled = torch.compile(block, backend="moec")
        out = compiled(x.to(DEVICE, torch.bfloat16).requires_grad_())
        out = (out[0] if isinstance(out, tuple) else out).cpu()
        probe = torch.randn(out.shape, dtype=torch.float64)
        grads = [g.cpu() for g in torch.autograd.grad((out.double() * probe).sum(), list(block.parameters()))]
    assert {"gate_up_wgrad", "input_rows", "down_wgrad"} <= set(joint), joint
    assert set(forward_calls) == ({"gate_up_rows", "down_rows"} if forward else set()), forward_calls
    out_ref = ref(x)
    out_ref = out_ref[0] if isinstance(out_ref, tuple) else out_ref
    want = torch.autograd.grad((out_ref * probe).sum(), list(ref.parameters()))
    assert rel_err(out, out_ref) < 2e-2
    for (name, _), g, w in zip(ref.named_parameters(), grads, want):
        assert rel_err(g, w) < 3e-2, name


def test_a_graph_compiled_with_the_switch_off_is_not_replayed_with_it_on(monkeypatch):
    """Inductor's and AOT autograd's caches outlive Dynamo's reset (and the process, on disk): the
    same block compiled again after MOEC_GROUPED_MM_WGRAD flipped must be compiled for it, not
    served the graph traced with the rows op's other output shapes (failed on an H200 before moec's
    cache tag carried the switch)."""
    from e2e.hf_models import moe_block
    monkeypatch.setattr(grouped_mm_wgrad, "ANY_DEVICE", True)
    block = moe_block("qwen3_moe", "grouped_mm").to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 7, 32, device=DEVICE).to(torch.bfloat16)
    got = []
    for on in (False, True):
        monkeypatch.setattr(grouped_mm_wgrad, "ENABLED", on)
        torch._dynamo.reset()
        with kernels.backend("triton"):
            out = torch.compile(block, backend="moec")(x)
            out = out[0] if isinstance(out, tuple) else out
            got.append(torch.autograd.grad(out.float().square().sum(), list(block.parameters())))
    for a, b in zip(*got):
        assert rel_err(b.cpu(), a.cpu()) < 2e-2
