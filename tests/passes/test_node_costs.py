"""passes/node_costs.py: seconds per ATen node from fake values, on graphs made by make_fx."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.passes.node_costs import UNKNOWN_SIZE, NodeCosts, size
from moec.runtime import AllToAllModel, ComputeModel

COMPUTE = ComputeModel(flops_per_s=1e12, bytes_per_s=1e10, launch_s=1e-6)


def nodes(fn, *inputs):
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    return {n.name: n for n in gm.graph.nodes}


def test_gemm_is_a_roofline_and_views_are_free():
    g = nodes(lambda a, b: (a.t() @ b).view(-1), torch.randn(64, 128), torch.randn(64, 32))
    c = NodeCosts(COMPUTE)
    flops, moved = 2 * 128 * 32 * 64, 4 * (64 * 128 + 64 * 32 + 128 * 32)
    assert c.compute_s(g["mm"]) == pytest.approx(1e-6 + max(flops / 1e12, moved / 1e10))
    assert c.compute_s(g["t"]) == c.compute_s(g["view"]) == 0.0


def test_experts_backward_counts_recompute_dx_and_weight_gradients():
    S, H, F, E = 12, 16, 8, 4
    args = (torch.randn(S, H), torch.randn(S // 2, H), torch.arange(S), torch.tensor([0, 3, 6, 9, 12]), 2,
            [torch.randn(E, 2 * F, H), torch.randn(E, H, F)])

    def f(gy, x, src, offsets, k, weights):
        return torch.ops.moec.experts_backward(gy, x, src, offsets, k, weights,
                                               f"w_up=0[{F}:{2 * F}:1] w_gate=0[0:{F}:1] w_down=1", "silu",
                                               0.0, 0.0, [True, True])
    g = nodes(f, *args)
    slow = ComputeModel(flops_per_s=1.0, bytes_per_s=1e30)     # seconds == flops
    # gated: recompute gate and up (4SHF), dh (2SHF), rows (4SHF), three weight gradients (6SHF)
    assert NodeCosts(slow).compute_s(g["experts_backward"]) == 16 * S * H * F


def test_all_to_all_time_from_its_send_splits():
    a2a = AllToAllModel(latency_s=1e-5, bandwidth_Bps=1e9, world_size=2)
    fn = lambda x: torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_to_all_single(x, [3, 5], [6, 2], "0"))
    g = nodes(fn, torch.randn(8, 16))
    row = 16 * 4
    c0, c1 = NodeCosts(COMPUTE, a2a, rank=0, world_size=2), NodeCosts(COMPUTE, a2a, rank=1, world_size=2)
    assert c0.comm_s(g["all_to_all_single"]) == pytest.approx(a2a.time([6 * row, 2 * row], rank=0))
    assert c1.comm_s(g["all_to_all_single"]) == pytest.approx(a2a.time([6 * row, 2 * row], rank=1))
    assert c0.compute_s(g["all_to_all_single"]) == c0.compute_s(g["wait_tensor"]) == 0.0
    assert NodeCosts(COMPUTE).comm_s(g["all_to_all_single"]) == 0.0      # no all-to-all model: free


def test_sizes_unknown_at_compile_time_count_as_the_fallback():
    env = ShapeEnv()
    u = env.create_unbacked_symint()
    assert size(u) == UNKNOWN_SIZE and size(u + 2) == UNKNOWN_SIZE + 2 and size(7) == 7
