"""What a training step keeps for backward (user pain: "the combine saves a [tokens*k, H] tensor"):
`moec.experts_combine` keeps x, the pre-activations (S, 2F) and the routing, never the experts'
grouped output y (S, H) that `moec.combine` alone keeps for the routing weights' gradient."""
import torch
from torch.autograd.graph import saved_tensors_hooks

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.codegen import layout as layouts
from moec.codegen import reference

T, E, k, H, F = 12, 4, 2, 24, 10       # S*H, S*2F and T*H all differ


def _saved_shapes(fused):
    x = torch.randn(T, H, requires_grad=True)
    gate_up = torch.randn(E, 2 * F, H, requires_grad=True)
    down = torch.randn(E, H, F, requires_grad=True)
    bases, lay = layouts.pack(((gate_up, False, (F, 1, 2 * F)), (gate_up, False, (0, 1, F)), (down, False, None),
                               None, None, None))
    w = torch.rand(T, k, requires_grad=True)
    offsets, src, inv = reference.plan(torch.stack([torch.randperm(E)[:k] for _ in range(T)]), E)
    shapes = []
    with saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        if fused:
            out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, w, k, bases, lay, "silu", 0.0, 0.0, True)
        else:
            y = torch.ops.moec.experts(x, src, offsets, k, bases, lay, "silu", 0.0, 0.0)
            out = torch.ops.moec.combine(y, inv, w)
    out.sum().backward()       # what was saved suffices
    assert x.grad is not None and w.grad is not None and gate_up.grad is not None and down.grad is not None
    return shapes


def test_fused_op_keeps_preactivations_not_grouped_outputs():
    S = T * k
    fused, apart = _saved_shapes(True), _saved_shapes(False)
    assert (S, H) in apart and (S, H) not in fused
    assert (S, 2 * F) in fused and (T, H) in fused
