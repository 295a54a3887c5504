import pytest
import torch

from moec.codegen import reference
from moec.codegen.errors import MoecKernelError

from kernel_helpers import DEVICE, rel_err

CASES = [  # T, E, k, scoring, n_group, topk_group, bias, renormalize
    (0, 8, 2, "softmax", 1, 1, False, True),
    (1, 8, 2, "softmax", 1, 1, False, False),
    (37, 8, 1, "softmax", 1, 1, False, True),
    (19, 6, 6, "softmax", 1, 1, False, True),              # k = E, E not a power of two
    (21, 8, 3, "softmax_after_topk", 1, 1, False, True),
    (33, 16, 4, "sigmoid", 4, 2, True, True),              # DeepSeek-V3 grouped top-k
    (17, 12, 3, "sigmoid", 1, 1, True, True),
    (9, 8, 2, "sigmoid", 8, 3, False, False),              # singleton groups
]


@pytest.mark.parametrize("T,E,k,scoring,n_group,topk_group,with_bias,renorm", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_and_backward(T, E, k, scoring, n_group, topk_group, with_bias, renorm, dtype):
    logits = (torch.randn(T, E, device=DEVICE) * 2).to(dtype).requires_grad_()
    bias = torch.randn(E, device=DEVICE) * 0.3 if with_bias else None
    w, ids = torch.ops.moec.route(logits, bias, k, scoring, renorm, 1.5, n_group, topk_group)
    w_ref, ids_ref = reference.route(logits.detach().cpu(), None if bias is None else bias.cpu(), k,
                                     scoring, renorm, 1.5, n_group, topk_group)
    # the chosen set must equal torch.topk's; compare the scores of the chosen (robust to ties)
    choice = _choice(logits.detach().cpu().float(), bias, scoring, n_group, topk_group)
    assert torch.equal(choice.gather(1, ids.cpu()).sort(1)[0], choice.gather(1, ids_ref).sort(1)[0])
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    if T == 0:
        return
    want = reference.route_weights(logits.detach().cpu().double(), ids.cpu(), scoring, renorm, 1.5)
    assert rel_err(w.cpu(), want) < 1e-6
    grad_w = torch.randn(T, k, device=DEVICE)
    (got,) = torch.autograd.grad(w, logits, grad_w)
    want = reference.route_weights_backward(grad_w.cpu().double(), logits.detach().cpu().double(),
                                            ids.cpu(), scoring, renorm, 1.5)
    # k = 1 with renormalisation has a zero gradient: compare with an absolute floor
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.cpu().double(), want.to(got.dtype).double(), rtol=tol, atol=tol * 1e-1)


def _choice(logits, bias, scoring, n_group, topk_group):
    if scoring == "softmax":
        return torch.softmax(logits, -1)
    if scoring == "softmax_after_topk":
        return logits
    s = torch.sigmoid(logits) + (0 if bias is None else bias.cpu())
    return reference._keep_top_groups(s, n_group, topk_group) if n_group > 1 else s


@pytest.mark.parametrize("T", [1, 40])
def test_grouped_fill_lets_dropped_experts_outrank_negative_kept_ones(T):
    """transformers' DeepseekV3 masks the dropped groups with 0.0, not -inf: a kept expert whose
    biased score is negative then loses to a dropped one (group_fill=0.0)."""
    E, G, k = 6, 2, 3
    logits = (torch.randn(T, E, device=DEVICE) * 2).requires_grad_()
    bias = torch.full((E,), -0.6, device=DEVICE) + torch.rand(E, device=DEVICE) * 0.2
    w, ids = torch.ops.moec.route(logits, bias, k, "sigmoid", True, 1.0, G, 1, 0.0)
    d = lambda t: t.detach().cpu().double()
    choice = reference.route_choice(d(logits), d(bias), "sigmoid", G, 1, 0.0)
    want = choice.topk(k, dim=-1)[0]
    assert torch.equal(choice.gather(1, ids.cpu()).sort(1, descending=True)[0], want)   # robust to ties at 0.0
    strict = reference.route_choice(d(logits), d(bias), "sigmoid", G, 1, None)
    dropped = torch.isinf(strict.gather(1, ids.cpu())).any(1)
    assert dropped.any() == (want[:, -1] == 0).any()     # a dropped expert chosen exactly where one must be
    torch.testing.assert_close(w.cpu().double(), reference.route_weights(d(logits), ids.cpu(), "sigmoid", True, 1.0),
                               rtol=1e-6, atol=1e-7)
    (got,) = torch.autograd.grad(w, logits, torch.ones_like(w))
    assert torch.isfinite(got).all()


def test_grouped_without_fill_needs_k_kept_experts():
    with pytest.raises(MoecKernelError, match="too few experts"):
        torch.ops.moec.route(torch.randn(3, 6, device=DEVICE), None, 4, "sigmoid", True, 1.0, 2, 1)
    torch.ops.moec.route(torch.randn(3, 6, device=DEVICE), None, 4, "sigmoid", True, 1.0, 2, 1, 0.0)
