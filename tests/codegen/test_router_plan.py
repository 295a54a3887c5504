"""router_plan_kernel.py (a decode step's router GEMM, routing and plan in one launch) against
float64 logits and against `moec.route_plan` run on the kernel's own logits: the same weights,
ids, offsets, src and inv, bit for bit, with either top-k; several programs of logits, the last
partial, H not a multiple of its block, a router bias, DeepSeek-V3's grouped sigmoid."""
import pytest
import torch

from moec.codegen import reference, route_plan_kernel
from moec.codegen.errors import MoecKernelError
from moec.codegen.route_plan_kernel import MAX_TOKENS
from moec.codegen.router_plan_kernel import router_plan_launch, takes

from kernel_helpers import DEVICE, padded, rel_err

CASES = [  # T, E, k, scoring, n_group, topk_group, score bias, router bias, dtype
    (1, 40, 8, "softmax", 1, 1, False, False, torch.float32),          # three programs of 16 experts, the last partial
    (2, 128, 8, "softmax", 1, 1, False, False, torch.bfloat16),         # Qwen3's decode step, two tokens
    (3, 32, 4, "softmax_after_topk", 1, 1, False, True, torch.bfloat16),  # GPT-OSS: a router bias
    (5, 16, 4, "sigmoid", 4, 2, True, False, torch.float32),            # DeepSeek-V3's grouped top-k
    (16, 8, 2, "softmax", 1, 1, False, False, torch.float16),           # the most tokens a launch takes
]


@pytest.mark.parametrize("sort", [False, True], ids=["argmax_rounds", "sort"])
@pytest.mark.parametrize("T,E,k,scoring,n_group,topk_group,with_bias,router_bias,dtype", CASES)
def test_router_plan_equals_linear_then_route_plan(monkeypatch, T, E, k, scoring, n_group, topk_group, with_bias,
                                                   router_bias, dtype, sort):
    H = 200
    x = padded((T, H), dtype)
    w_router = (torch.randn(E, H, device=DEVICE) * H ** -0.5).to(dtype)
    b_router = (torch.randn(E, device=DEVICE) * 0.1).to(dtype) if router_bias else None
    bias = torch.rand(E, device=DEVICE) * 0.01 if with_bias else None
    got = router_plan_launch(x, w_router, b_router, bias, k, scoring, True, 1.5, n_group, topk_group, sort=sort,
                             block_h=64)
    want = x.double() @ w_router.double().t() + (0 if b_router is None else b_router.double())
    assert got[0].dtype == dtype and rel_err(got[0], want) < (1e-6 if dtype == torch.float32 else 1e-2)
    monkeypatch.setattr(route_plan_kernel, "SORT", sort)
    routed = torch.ops.moec.route_plan(got[0], bias, k, scoring, True, 1.5, n_group, topk_group, E)
    for a, b in zip(got[1:], routed):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_a_kept_counter_is_zero_again_after_each_launch():
    """A caller may keep the ticket counter across launches: the last program zeroes it, so the next
    launch routes from its own logits (a counter left at 3 would let its first program route alone)."""
    E, H, k = 48, 32, 2
    w_router = torch.randn(E, H, device=DEVICE)
    ticket = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for _ in range(3):
        x = torch.randn(2, H, device=DEVICE)
        got = router_plan_launch(x, w_router, None, None, k, "softmax", True, 1.0, 1, 1, ticket=ticket)
        assert ticket.item() == 0
        want = torch.ops.moec.route_plan(got[0], None, k, "softmax", True, 1.0, 1, 1, E)
        assert all(torch.equal(a, b) for a, b in zip(got[1:], want))


def test_what_it_takes():
    assert takes(1, 8) and takes(16, 8)
    assert not takes(0, 8) and not takes(17, 2) and not takes(16, 9)     # > 128 copies
    with pytest.raises(ValueError, match="not a decode batch"):
        router_plan_launch(torch.randn(17, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE), None, None, 2,
                           "softmax", True, 1.0, 1, 1)


@pytest.mark.parametrize("T,with_rb", [(0, False), (1, True), (5, False), (MAX_TOKENS + 4, True)],
                         ids=["no_tokens", "one_token", "five", "above_one_launch"])
def test_router_plan_op_values_and_gradients(T, with_rb):
    """`moec.router_plan` (one launch up to MAX_TOKENS, else the linear layer then route_plan):
    logits, weights, ids and plan against float64, and the gradients into x, the router's weight
    and bias through both the routing weights and the logits (which a graph may read elsewhere)."""
    E, H, k, scoring = 24, 40, 4, "softmax"
    x = torch.randn(T, H, device=DEVICE, requires_grad=True)
    w_router = (torch.randn(E, H, device=DEVICE) * H ** -0.5).requires_grad_()
    b_router = (torch.randn(E, device=DEVICE) * 0.1).requires_grad_() if with_rb else None
    leaves = [t for t in (x, w_router, b_router) if t is not None]
    logits, w, ids, offsets, src, inv = torch.ops.moec.router_plan(x, w_router, b_router, None, k, scoring, True,
                                                                   1.5, 1, 1, E)
    d = lambda t: t.detach().cpu().double().requires_grad_()     # noqa: E731
    refs = [d(t) for t in leaves]
    want_logits = refs[0] @ refs[1].t() + (refs[2] if with_rb else 0)
    w_ref, ids_ref = reference.route(want_logits, None, k, scoring, True, 1.5, 1, 1)
    assert rel_err(logits.detach().cpu(), want_logits.detach()) < 1e-5 if T else logits.shape == (0, E)
    assert torch.equal(ids.cpu(), ids_ref)
    for got, want in zip((offsets, src, inv), reference.plan(ids_ref, E)):
        assert torch.equal(got.cpu(), want)
    if T == 0:
        return
    assert rel_err(w.detach().cpu(), w_ref.detach()) < 1e-5
    g_w, g_logits = torch.randn(T, k, device=DEVICE), torch.randn(T, E, device=DEVICE)
    got = torch.autograd.grad((w * g_w).sum() + (logits * g_logits).sum(), leaves)
    want = torch.autograd.grad((w_ref * g_w.cpu().double()).sum() + (want_logits * g_logits.cpu().double()).sum(),
                               refs)
    for a, b in zip(got, want):
        assert rel_err(a.cpu(), b) < 1e-5


def test_router_plan_op_refuses_what_a_linear_layer_cannot_take():
    x, w_router = torch.randn(3, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    with pytest.raises(MoecKernelError, match="features"):
        torch.ops.moec.router_plan(x, w_router[:, :12], None, None, 2, "softmax", True, 1.0, 1, 1, 8)
    with pytest.raises(MoecKernelError, match="one dtype"):
        torch.ops.moec.router_plan(x, w_router.double(), None, None, 2, "softmax", True, 1.0, 1, 1, 8)
    with pytest.raises(MoecKernelError, match="b_router has shape"):
        torch.ops.moec.router_plan(x, w_router, torch.randn(7, device=DEVICE), None, 2, "softmax", True, 1.0, 1, 1,
                                   8)
    with pytest.raises(MoecKernelError, match="top-k 9"):
        torch.ops.moec.router_plan(x, w_router, None, None, 9, "softmax", True, 1.0, 1, 1, 8)
