"""A plain MoE layer written with moec's ops, run single-process or expert-parallel, and the
helpers the runtime tests share. Legend: T tokens, H hidden, F width, E experts, k top-k."""
import torch
import torch.distributed as dist
import torch.nn as nn

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.codegen import layout as layouts
from moec.runtime import ep_experts

H, F = 8, 6


class Experts(nn.Module):
    """Expert weights with a leading E dimension, as moec.experts reads them."""

    def __init__(self, E, gated=True, bias=True, dtype=torch.float64):
        super().__init__()
        p = lambda *s: nn.Parameter(torch.randn(*s, dtype=dtype) / s[-1] ** 0.5)
        self.w_up, self.w_down = p(E, F, H), p(E, H, F)
        self.w_gate = p(E, F, H) if gated else None
        self.b_up, self.b_gate, self.b_down = (p(E, F), p(E, F) if gated else None, p(E, H)) if bias else (None,) * 3

    def weights(self):
        return (self.w_up, self.w_gate, self.w_down, self.b_up, self.b_gate, self.b_down)


def moe(x, logits, k, experts, activation="silu", group_name=None, capacity_factor=0.0, site="moe",
        capacity=None):
    """out (T, H) = the routed experts' weighted sum: moec.route/plan/experts/combine, with
    moec.experts swapped for its expert-parallel twin when group_name is given. capacity=C
    (single process only): copies past the first C of each expert are dropped."""
    E = logits.shape[1]
    weights, ids = torch.ops.moec.route(logits, None, k, "softmax", True, 1.0, 1, 1)
    offsets, src, inv = torch.ops.moec.plan(ids, E)
    bases, layout = layouts.pack([None if w is None else (w, False, None) for w in experts.weights()])
    args = (x, src, offsets, k, bases, layout, activation, 0.0, 0.0)
    y = torch.ops.moec.experts(*args) if group_name is None else \
        ep_experts(*args, group_name, capacity_factor=capacity_factor, site=site)
    if capacity is not None:
        y = y * _first_copies(offsets, capacity, y.shape[0])[:, None]
    return torch.ops.moec.combine(y, inv, weights)


def _first_copies(offsets, C, S):
    """(S,) mask of the grouped slots within the first C of their expert."""
    keep = torch.zeros(S, dtype=torch.float64)
    bounds = offsets.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        keep[lo:min(hi, lo + C)] = 1
    return keep


def full(t):
    """A DTensor's full value (gathers shards); a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def summed(t):
    """t summed over all ranks: the gradient a weight gets from every rank's tokens."""
    t = t.clone()
    dist.all_reduce(t)
    return t
