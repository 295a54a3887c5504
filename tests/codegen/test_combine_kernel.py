"""combine and combine_backward (combine_kernel.py, combine_backward_kernel.py) vs float64."""
import pytest
import torch

from moec.codegen import reference
from moec.codegen.combine_kernel import combine_launch

from kernel_helpers import DEVICE, TOL, padded, rel_err


@pytest.mark.parametrize("T,k,H", [(0, 2, 8), (1, 1, 5), (37, 2, 40), (9, 8, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_forward_backward(T, k, H, dtype):
    S = T * k
    y = padded((S, H), dtype).requires_grad_()                      # NaN right of each row
    inv = torch.randperm(S, device=DEVICE)
    w = torch.rand(T, k, device=DEVICE).requires_grad_()
    out = torch.ops.moec.combine(y, inv, w)
    want = reference.combine(y.detach().cpu().double(), inv.cpu(), w.detach().cpu().double())
    assert out.shape == (T, H) and out.dtype == dtype
    if T == 0:
        return
    assert rel_err(out.cpu(), want) < TOL[dtype]
    g = torch.randn_like(out)
    gy, gw = torch.autograd.grad(out, (y, w), g)
    rows = y.detach().cpu().double()[inv.cpu()].view(T, k, H)
    assert rel_err(gw.cpu(), (rows * g.cpu().double().unsqueeze(1)).sum(-1)) < TOL[dtype]
    want_rows = (g.cpu().double().unsqueeze(1) * w.detach().cpu().double().unsqueeze(-1)).view(S, H)
    assert rel_err(gy.cpu(), torch.empty_like(want_rows).index_copy_(0, inv.cpu(), want_rows)) < TOL[dtype]


def test_unweighted_sum_is_deterministic():
    rows = torch.randn(60, 33, device=DEVICE)
    inv = torch.randperm(60, device=DEVICE)
    runs = [combine_launch(rows, inv, None, torch.empty(20, 33, device=DEVICE), 3) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert rel_err(runs[0].cpu(), rows.cpu().double()[inv.cpu()].view(20, 3, 33).sum(1)) < 1e-6
