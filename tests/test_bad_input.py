"""Bad or extreme input: a correct result or a clear MoecError, never a wrong answer."""
import pytest
import torch

import moec
from compare import check_compiled_matches_eager
from moe_idioms import MaskLoopMoE

E, H, F = 4, 32, 16


def _one_expert_model(top_k):
    """Every token's top-1 is expert 2: experts 0, 1, 3 get few or no tokens."""
    torch.manual_seed(0)
    m = MaskLoopMoE(experts=E, top_k=top_k).double()
    with torch.no_grad():
        m.gate.weight.normal_(0, 0.01)
        m.gate.weight[2] = 5.0
    return m


@pytest.mark.parametrize("top_k", [1, 2])
def test_every_token_on_one_expert(top_k):
    m = _one_expert_model(top_k)
    x = torch.rand(9, H, dtype=torch.float64) + 0.1     # positive, so expert 2 always wins
    assert (m.gate(x).argmax(-1) == 2).all()
    check_compiled_matches_eager(m, x)


def test_zero_tokens_at_first_compile_is_a_reported_miss_with_correct_result():
    m = MaskLoopMoE().double()
    report = moec.explain(m, torch.randn(0, H, dtype=torch.float64))
    [region] = report.regions
    assert region.status == "missed" and "zero tokens" in region.reason
    out = torch.compile(m, backend="moec", options={"dense_backend": "eager"})(torch.randn(0, H, dtype=torch.float64))
    assert out.shape == (0, H)


def _op_args(dtype=torch.float32, device="cpu", w_device="cpu"):
    x = torch.randn(5, H, dtype=dtype, device=device)
    ids = torch.randint(0, E, (5, 2))
    offsets, src, _ = torch.ops.moec.plan(ids, E)
    w = lambda *s: torch.randn(*s, dtype=dtype if dtype.is_floating_point else torch.float32, device=w_device)
    return (x, src.to(device), offsets.to(device), 2, [w(E, F, H), w(E, F, H), w(E, H, F)],
            "w_up=0 w_gate=1 w_down=2", "silu", 0.0, 0.0)


def test_unsupported_dtype_names_the_tensor():
    args = list(_op_args())
    args[0] = args[0].to(torch.int32)
    with pytest.raises(moec.MoecError, match="x has dtype torch.int32"):
        torch.ops.moec.experts(*args)


def test_device_mismatch_names_both_devices():
    with pytest.raises(moec.MoecError, match="w_up is on meta but the other inputs are on cpu"):
        torch.ops.moec.experts(*_op_args(w_device="meta"))


def test_mixed_weight_dtypes_rejected():
    args = list(_op_args())
    args[4][2] = args[4][2].double()
    with pytest.raises(moec.MoecError, match="w_down is torch.float64 but x is torch.float32"):
        torch.ops.moec.experts(*args)


def test_ragged_weight_shapes_rejected():
    args = list(_op_args())
    args[4][2] = args[4][2][:, :, :-1]
    with pytest.raises(moec.MoecError, match="w_down must have shape"):
        torch.ops.moec.experts(*args)


def test_top_k_larger_than_experts_rejected():
    with pytest.raises(moec.MoecError, match="top-k 5 must be between 1 and the number of experts 4"):
        torch.ops.moec.route(torch.randn(3, E), None, 5, "softmax", True, 1.0, 1, 1)
