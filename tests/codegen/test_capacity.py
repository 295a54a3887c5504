"""moec.capacity_keep against a plain loop, and dropped copies (id -1) through the Triton
plan / experts / combine kernels: they add exactly nothing."""
import pytest
import torch

from moec.codegen.capacity import reference_capacity_keep

from kernel_helpers import DEVICE, TOL, rel_err


def _loop_keep(ids, E, capacity, order):
    T, k = ids.shape
    seen, keep = [0] * E, torch.zeros(T, k, dtype=torch.bool)
    copies = [(t, j) for j in range(k) for t in range(T)] if order == "choice_major" else \
        [(t, j) for t in range(T) for j in range(k)]
    for t, j in copies:
        e = int(ids[t, j])
        if 0 <= e < E:
            keep[t, j] = seen[e] < capacity
            seen[e] += 1
    return keep


@pytest.mark.parametrize("order", ["choice_major", "token_major"])
@pytest.mark.parametrize("T,k,E,capacity", [(0, 2, 4, 3), (1, 1, 3, 1), (13, 2, 4, 3), (9, 3, 3, 2), (16, 2, 4, 0)])
def test_capacity_keep_matches_loop(order, T, k, E, capacity):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.long)
    ids[ids == E - 1] = -1 if T > 4 else E - 1        # some copies already dropped upstream
    got = torch.ops.moec.capacity_keep(ids, E, capacity, order)
    assert torch.equal(got, _loop_keep(ids, E, capacity, order))
    assert torch.equal(got, reference_capacity_keep(ids, E, capacity, order))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_copies_contribute_nothing(dtype):
    T, k, E, H, F = 11, 2, 4, 32, 16
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEVICE)
    keep = torch.ops.moec.capacity_keep(ids, E, 2, "choice_major")
    assert not keep.all() and keep.any()
    ids = torch.where(keep, ids, -1)
    w = torch.rand(T, k, device=DEVICE) * keep
    w_up, w_gate = (torch.randn(E, F, H, device=DEVICE).to(dtype) for _ in range(2))
    w_down = torch.randn(E, H, F, device=DEVICE).to(dtype)
    offsets, src, inv = torch.ops.moec.plan(ids, E)
    assert int(offsets[-1]) == int(keep.sum())
    y = torch.ops.moec.experts(x, src, offsets, k, [w_up, w_gate, w_down], "w_up=0 w_gate=1 w_down=2",
                               "silu", 0.0, 0.0)
    out = torch.ops.moec.combine(y, inv, w)
    ref = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            if keep[t, j]:
                e, xt = int(ids[t, j]), x[t].double()
                h = torch.nn.functional.silu(w_gate[e].double() @ xt) * (w_up[e].double() @ xt)
                ref[t] += (w[t, j].double() * (w_down[e].double() @ h)).cpu()
    assert rel_err(out.cpu(), ref) <= TOL[dtype] * 10
