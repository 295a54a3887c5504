"""`moec.route_plan` through the Triton path: one launch (route, barrier, plan) at decode sizes,
route + plan launches above them; the same weights, ids, offsets, src, inv as the references
route then plan, and the weights' gradient into the logits."""
import pytest
import torch

from moec.codegen import reference, route_plan_kernel
from moec.codegen.route_plan_kernel import MAX_COPIES, MAX_TOKENS

from kernel_helpers import DEVICE, rel_err

CASES = [  # T, E, k, scoring, n_group, topk_group, bias (+ group_fill)
    (0, 8, 2, "softmax", 1, 1, False),
    (1, 128, 8, "softmax", 1, 1, False),                  # Qwen3's decode step
    (3, 6, 6, "softmax", 1, 1, False),                    # k = E, E not a power of two
    (5, 8, 3, "softmax_after_topk", 1, 1, False),
    (7, 16, 4, "sigmoid", 4, 2, True),                    # DeepSeek-V3 grouped top-k
    (7, 16, 4, "sigmoid", 4, 2, True, 0.0),               # transformers' DeepseekV3 (dropped groups 0.0)
    (MAX_TOKENS + 1, 16, 4, "sigmoid", 4, 2, True, 0.0),
    (MAX_TOKENS, 8, 2, "softmax", 1, 1, False),           # the largest single launch
    (MAX_TOKENS + 1, 8, 2, "softmax", 1, 1, False),       # two ops' launches
    (MAX_COPIES // 8 + 3, 64, 8, "sigmoid", 1, 1, True),  # too many copies for one program
]


@pytest.mark.parametrize("sort", [False, True], ids=["argmax_rounds", "sort"])
@pytest.mark.parametrize("T,E,k,scoring,n_group,topk_group,with_bias,fill", [c + (None,) * (8 - len(c)) for c in CASES])
def test_route_plan_equals_route_then_plan(monkeypatch, T, E, k, scoring, n_group, topk_group, with_bias, fill, sort):
    """Either top-k of the single launch (k argmax rounds, or one sort of (score, index) keys)."""
    monkeypatch.setattr(route_plan_kernel, "SORT", sort)
    # distinct scores (a permutation scaled): ties would let equal-scored experts swap
    logits = (torch.stack([torch.randperm(E) for _ in range(T)]).float() if T else torch.zeros(0, E)).to(DEVICE)
    logits = (logits * 0.03 + torch.rand(T, E).to(DEVICE) * 0.001).requires_grad_()
    bias = torch.rand(E, device=DEVICE) * 0.01 if with_bias else None
    if fill is not None:     # one expert in each group of 4 scores above the fill, the rest below: with
        bias = bias - (torch.arange(E, device=DEVICE) % 4 != 0) * 1.0    # 2 groups kept, k = 4 takes 2 dropped
    w, ids, offsets, src, inv = torch.ops.moec.route_plan(logits, bias, k, scoring, True, 1.5, n_group, topk_group,
                                                          E, fill)
    d = lambda t: None if t is None else t.detach().cpu().double()
    w_ref, ids_ref = reference.route(d(logits), d(bias), k, scoring, True, 1.5, n_group, topk_group, fill)
    if fill is not None:    # the dropped experts tie at the fill: which of them is taken is unspecified
        choice = reference.route_choice(d(logits), d(bias), scoring, n_group, topk_group, fill)
        assert torch.equal(choice.gather(1, ids.cpu()).sort(1)[0], choice.gather(1, ids_ref).sort(1)[0])
        assert (choice.gather(1, ids.cpu()) == fill).any()      # the case is exercised
        ids_ref = ids.cpu()
        w_ref = reference.route_weights(d(logits), ids_ref, scoring, True, 1.5)
    assert torch.equal(ids.cpu(), ids_ref)
    for got, want in zip((offsets, src, inv), reference.plan(ids_ref, E)):
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)
    if T == 0:
        return
    assert rel_err(w.cpu(), w_ref) < 1e-6
    grad_w = torch.randn(T, k, device=DEVICE)
    (got,) = torch.autograd.grad(w, logits, grad_w)
    want = reference.route_weights_backward(grad_w.cpu().double(), d(logits), ids_ref, scoring, True, 1.5)
    assert rel_err(got.cpu(), want) < 1e-5


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = torch.ops.moec.route_plan(torch.empty(5, 8), None, 2, "softmax", True, 1.0, 1, 1, 8)
    assert [tuple(t.shape) for t in out] == [(5, 2), (5, 2), (9,), (10,), (10,)]


@pytest.mark.parametrize("scoring,with_bias", [("softmax", False), ("softmax_after_topk", False), ("sigmoid", True)])
def test_sorted_top_k_breaks_ties_as_argmax_rounds(monkeypatch, scoring, with_bias):
    """Many equal scores (logits on a grid of 4 values): the sort and the argmax rounds pick the
    same experts in the same order (ties to the lower index) with bitwise equal weights."""
    T, E, k = 3, 64, 8
    logits = (torch.randint(0, 4, (T, E)).float() * 0.5).to(DEVICE)
    bias = (torch.randint(0, 2, (E,)).float() * 0.25).to(DEVICE) if with_bias else None
    got = {}
    for sort in (False, True):
        monkeypatch.setattr(route_plan_kernel, "SORT", sort)
        got[sort] = torch.ops.moec.route_plan(logits, bias, k, scoring, True, 1.0, 1, 1, E)
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b)
