"""runtime/expert_parallel.py: `ep_experts` on 2 and 4 gloo ranks computes what single-process
`moec.experts` computes, forward and backward (outputs, input and router grads, and every expert
weight's grad summed over all ranks' tokens)."""
import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.testing import assert_close

from moe_ops import H, Experts, full, moe, summed
from moec.codegen.errors import MoecError
from moec.runtime import shard_experts


def _inputs(rank, ws, T, E, route):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    if route == "rank0_only":          # every copy goes to rank 0's experts: the others get none
        logits[:, :E // ws] += 30
    elif route == "one_expert":        # very uneven: most copies pile onto the last expert
        logits[:, -1] += 30
    return x, logits, torch.randn(T, H, generator=g, dtype=torch.float64)


def _run(mod, x, logits, probe, k, activation, group, capacity_factor=0.0, capacity=None):
    x, logits = x.clone().requires_grad_(), logits.clone().requires_grad_()
    out = moe(x, logits, k, mod, activation, group, capacity_factor, capacity=capacity)
    params = [p for p in mod.weights() if p is not None]
    grads = torch.autograd.grad((out * probe).sum(), [x, logits, *params])
    return out, grads


def check_matches_single_process(rank, ws, E, k, tokens, route, gated, bias, activation, form):
    torch.manual_seed(0)   # same expert weights on every rank
    ref = Experts(E, gated, bias)
    ep = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    if form == "dtensor":
        assert len(shard_experts(ep, mesh)) == sum(w is not None for w in ref.weights())
    x, logits, probe = _inputs(rank, ws, tokens[rank], E, route)
    out_ref, g_ref = _run(ref, x, logits, probe, k, activation, None)
    out_ep, g_ep = _run(ep, x, logits, probe, k, activation, mesh.get_group().group_name)
    assert_close(out_ep, out_ref)
    assert_close(g_ep[0], g_ref[0], msg="grad of x")
    assert_close(g_ep[1], g_ref[1], msg="grad of router logits")
    for i, (a, b) in enumerate(zip(g_ep[2:], g_ref[2:])):
        got = full(a) if form == "dtensor" else summed(a)   # replicated weights: data-parallel sum
        assert_close(got, summed(b), msg=f"grad of expert weight {i}")


CASES = {   # name: (E, k, tokens per rank, routing, gated, bias, activation, weights form)
    "gated_bias": (4, 2, (5, 7), "random", True, True, "silu", "dtensor"),
    "plain_gelu": (4, 1, (6, 3), "random", False, False, "gelu", "dtensor"),
    "replicated_weights": (4, 2, (5, 4), "random", True, False, "silu", "full"),
    "uneven": (4, 2, (9, 2), "one_expert", True, True, "silu", "dtensor"),
    "rank_without_work": (4, 2, (6, 5), "rank0_only", True, True, "silu", "dtensor"),
    "rank_sends_nothing": (4, 2, (7, 0), "random", True, True, "silu", "dtensor"),
}


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_match_single_process(pool2, case):
    pool2.run(check_matches_single_process, *CASES[case])


@pytest.mark.parametrize("case", ["gated_bias", "uneven", "rank_without_work", "rank_sends_nothing"])
def test_four_ranks_match_single_process(pool4, case):
    E, k, _, route, gated, bias, act, form = CASES[case]
    tokens = (3, 0, 6, 2) if case == "rank_sends_nothing" else (5, 3, 4, 6)
    pool4.run(check_matches_single_process, 8, k, tokens, route, gated, bias, act, form)


def check_capacity(rank, ws, E, k, T, capacity_factor):
    from moec.runtime.expert_parallel import capacity
    torch.manual_seed(0)
    ref = Experts(E)
    ep = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    shard_experts(ep, mesh)
    x, logits, probe = _inputs(rank, ws, T, E, "one_expert")
    C = capacity(T * k, E, capacity_factor)
    out_ep, g_ep = _run(ep, x, logits, probe, k, "silu", mesh.get_group().group_name, capacity_factor)
    out_ref, g_ref = _run(ref, x, logits, probe, k, "silu", None, capacity=C)
    assert_close(out_ep, out_ref)
    for i, (a, b) in enumerate(zip(g_ep, g_ref)):
        assert_close(full(a) if i >= 2 else a, summed(b) if i >= 2 else b, msg=f"grad {i}")


@pytest.mark.parametrize("capacity_factor", [0.5, 8.0])   # drops some copies / drops none
def test_capacity_mode(pool2, capacity_factor):
    pool2.run(check_capacity, 4, 2, 6, capacity_factor)


def check_not_divisible(rank, ws):
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    with pytest.raises(MoecError, match="3 experts cannot be split evenly over an expert-parallel group of 2"):
        shard_experts(Experts(3), mesh)
    x, logits, _ = _inputs(rank, ws, 4, 3, "random")
    with pytest.raises(MoecError, match="3 experts cannot be split evenly"):
        moe(x, logits, 1, Experts(3), group_name=mesh.get_group().group_name, site="layers.0.mlp")


def test_experts_not_divisible_by_group(pool2):
    pool2.run(check_not_divisible)
