"""The forward's GEMMs through torch._grouped_mm (codegen/grouped_mm_forward.py) against float64:
the down projection in both orientations of its base; the gate/up projection where gate and up share
a base, in each order and orientation, whose saved pre-activations the backward then reads in the
base's column order; experts with no rows, a dropped copy (its row of y zero), every copy on one
expert; values and, through the training ops, every gradient; and where each must not be taken. On
the CPU the path runs on torch's fallback of `_grouped_mm` (ANY_DEVICE); on an sm90 card on
CUTLASS's kernel."""
import pytest
import torch

from moec.codegen import grouped_mm_forward, grouped_mm_wgrad, kernels, reference
from moec.codegen import layout as layouts

from kernel_helpers import DEVICE, record_calls, rel_err
from test_experts_launch import _routing
# the layer's sizes are those test_grouped_mm_wgrad's layers and train_combine are built with
from test_grouped_mm_wgrad import ARGS, E, F, H, _d, _joint_layer, _layer, assert_combine_grads, k, train_combine

OPS = torch.ops.moec


@pytest.fixture
def taken(monkeypatch):
    monkeypatch.setattr(grouped_mm_wgrad, "ANY_DEVICE", True)
    monkeypatch.setattr(grouped_mm_forward, "DOWN", True)
    return record_calls(monkeypatch, grouped_mm_forward, "down_rows")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("how", ["uniform", "sparse", "one_expert"])
def test_experts_forward_down_through_grouped_mm(taken, transposed, how):
    T = 9
    offsets, src, inv = _routing(T, E, k, how)
    bases, layout = _layer(transposed, False)
    x = torch.randn(T, H, device=DEVICE).to(torch.bfloat16)
    with kernels.backend("triton"):
        y = OPS.experts(x, src, offsets, k, bases, layout, *ARGS)
    assert taken, "the grouped_mm path was not taken"
    want = reference.experts(_d(x), src.cpu(), offsets.cpu(), k, [_d(b) for b in bases], layout, *ARGS)
    end = int(offsets[-1])
    assert rel_err(y.cpu()[:end], want[:end]) < 2e-2
    assert torch.equal(y.cpu()[end:], torch.zeros_like(y.cpu()[end:]))      # dropped copies' rows: zeros


@pytest.mark.parametrize("how", ["uniform", "sparse"])
def test_training_op_with_the_grouped_mm_down(taken, how):
    """experts_combine forward (saving the pre-activations) and its backward, against float64."""
    bases, layout = _layer(False, False)
    run = train_combine(bases, layout, how)
    assert taken
    want_out = reference.experts_combine(_d(run.x), *run.routing64, [_d(b) for b in bases], layout, *ARGS,
                                         False)[0]
    assert rel_err(run.out.cpu(), want_out) < 2e-2
    assert_combine_grads(run, bases, layout)


def test_where_the_grouped_mm_down_is_not_taken(taken, monkeypatch):
    bases, layout = _layer(False, True)
    w_down, b_down = layouts.views(bases, layout)[2], layouts.views(bases, layout)[5]
    h = torch.randn(6, F, device=DEVICE).to(torch.bfloat16)
    assert grouped_mm_forward.down_taken(h, w_down, None, None, False)
    assert not grouped_mm_forward.down_taken(h.float(), w_down, None, None, False)          # bf16 only
    assert not grouped_mm_forward.down_taken(h, w_down, b_down, None, False)                # a down bias
    assert not grouped_mm_forward.down_taken(h, w_down, None, (h, h), False)                # LoRA
    assert not grouped_mm_forward.down_taken(h, w_down, None, None, True)                   # PDL chain
    assert not grouped_mm_forward.down_taken(h, w_down[:, :, :F - 3], None, None, False)    # unaligned rows
    monkeypatch.setattr(grouped_mm_forward, "DOWN", False)
    assert not grouped_mm_forward.down_taken(h, w_down, None, None, False)                  # switched off


@pytest.fixture
def gate_up(monkeypatch):
    monkeypatch.setattr(grouped_mm_wgrad, "ANY_DEVICE", True)
    monkeypatch.setattr(grouped_mm_forward, "GATE_UP", True)
    monkeypatch.setattr(grouped_mm_forward, "DOWN", True)
    return record_calls(monkeypatch, grouped_mm_forward, "gate_up_rows")


@pytest.mark.parametrize("wgrad", [False, True])
@pytest.mark.parametrize("transposed,gate_first", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("how", ["uniform", "sparse", "one_expert"])
def test_training_op_with_the_grouped_mm_gate_up(gate_up, monkeypatch, wgrad, transposed, gate_first, how):
    """experts_combine (saving pre in the base's column order) and its backward, with the backward's
    CUTLASS GEMMs on or off, against float64: the output, dx, the routing weights', every weight's."""
    monkeypatch.setattr(grouped_mm_wgrad, "ENABLED", wgrad)
    bases, layout = _joint_layer(transposed, gate_first)
    run = train_combine(bases, layout, how)
    assert gate_up, "the grouped_mm gate/up path was not taken"
    want_out, want_pre = reference.experts_combine(_d(run.x), *run.routing64, [_d(b) for b in bases], layout, *ARGS,
                                                   True)
    assert rel_err(run.out.cpu(), want_out) < 2e-2
    mine = run.pre.cpu()                 # the base's order; the reference's is u | g
    if gate_first:
        mine = torch.cat([mine[:, F:], mine[:, :F]], 1)
    end = int(run.offsets[-1])
    assert rel_err(mine[:end], want_pre[:end]) < 2e-2
    assert_combine_grads(run, bases, layout)


def test_expert_parallel_ops_with_the_grouped_mm_gate_up(gate_up):
    """experts_save's pre (gate first: the base's order) read back by experts_backward, and the
    inference op (no pre kept), against float64."""
    T = 9
    offsets, src, inv = _routing(T, E, k, "sparse")
    bases, layout = _joint_layer(False, True)
    x = torch.randn(T, H, device=DEVICE).to(torch.bfloat16).requires_grad_()
    for b in bases:
        b.requires_grad_()
    with kernels.backend("triton"):
        y_inf = OPS.experts(x.detach(), src, offsets, k, bases, layout, *ARGS)
        y, pre = OPS.experts_save(x, src, offsets, k, bases, layout, *ARGS)
        gy = torch.randn_like(y)
        grads = OPS.experts_backward(gy, x, src, offsets, k, bases, layout, *ARGS, [True] * len(bases), pre)
    assert len(gate_up) == 2
    ref_bases = [_d(b) for b in bases]
    want_y = reference.experts(_d(x), src.cpu(), offsets.cpu(), k, ref_bases, layout, *ARGS)
    end = int(offsets[-1])
    for got in (y, y_inf):
        assert rel_err(got.cpu()[:end], want_y[:end]) < 2e-2
        assert torch.equal(got.cpu()[end:], torch.zeros_like(got.cpu()[end:]))
    want = reference.experts_backward(_d(gy), _d(x), src.cpu(), offsets.cpu(), k, ref_bases, layout, *ARGS)
    for i, (g, w) in enumerate(zip(grads, want)):
        assert rel_err(g.cpu(), w) < 2e-2, i


def test_where_the_grouped_mm_gate_up_is_not_taken(gate_up, monkeypatch):
    bases, layout = _joint_layer(False, True)
    x = torch.randn(6, H, device=DEVICE).to(torch.bfloat16)
    assert grouped_mm_forward.gate_up_joint(x, bases, layout) == (0, False, 0, F)
    assert grouped_mm_forward.pre_columns(x, bases, layout, F) == (F, 0)
    assert grouped_mm_forward.gate_up_joint(x.float(), bases, layout) is None               # bf16 only
    assert grouped_mm_forward.pre_columns(x.float(), bases, layout, F) == (0, F)            # moec's u | g
    interleaved = layouts.pack([(bases[0], False, (1, 2, None)), (bases[0], False, (0, 2, None)),
                                (bases[1], False, None)])[1]
    assert grouped_mm_forward.gate_up_joint(x, bases, interleaved) is None                  # GPT-OSS's order
    monkeypatch.setattr(grouped_mm_forward, "GATE_UP", False)
    assert grouped_mm_forward.gate_up_joint(x, bases, layout) is None                       # switched off
