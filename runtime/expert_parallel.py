"""The expert-parallel twin of `moec.experts`, built from moec ops and the all-to-all primitives.

Legend: T tokens on this rank, H hidden, F expert width, E experts (global), k top-k,
S = T*k token copies, ep ranks in the EP group, El = E/ep local experts, R rows received.

`moec.plan` already orders copies by expert, and rank r owns experts [r*El, (r+1)*El), so the
grouped slots are also grouped by destination rank: slot block r goes to rank r as is.

    dispatch   rows = x[src // k]                       (kept, H)  grouped = by destination
               got  = all_to_all(rows)                   (R, H)     by (source rank, local expert)
    local      plan/experts over got, k=1                (R, H)     regrouped by local expert, then back
    combine    y    = all_to_all(back)                   (kept, H)  in this rank's slot order
    pad        dropped copies (past offsets[E]) are zero rows, as in moec.experts
"""
import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from moec.codegen import layout as layouts
from moec.codegen.errors import MoecError

from .all_to_all import all_to_all, exchange_counts, host_splits
from .consistency import checked, fingerprint
from .mesh import group_by_name


def ep_experts(x: Tensor, src: Tensor, offsets: Tensor, k: int, weights: list, layout: str, activation: str,
               alpha: float, limit: float, group_name: str, capacity_factor: float = 0.0, site: str = "") -> Tensor:
    """Same contract as `moec.experts` (x (T, H), src (S,), offsets (E+1,) -> y (S, H) grouped by
    expert, zero rows past offsets[E]; `weights` the distinct base tensors, `layout` their views),
    with the experts spread over the EP group `group_name`.

    Expert weights may be DTensors sharded on dim 0 over the group (see `shard_experts`), local
    shards with El experts, or full (E, ...) tensors, of which each rank uses its own slice (the
    gradient then lands in that slice only: sum it over the group, as data parallelism does).
    Layout views slice dim 1 and transpose the last two, so dim 0 is experts in every base.
    capacity_factor > 0: each rank sends at most C = ceil(capacity_factor * S / E) copies to each
    expert (the first ones in token order); the rest get zero rows. C must agree across ranks, so
    every rank must have the same T. capacity_factor = 0: dropless, one host sync per call.
    Every rank of the group must call this for the same layers in the same order.
    """
    group = group_by_name(group_name)
    E = offsets.shape[0] - 1
    El = group.local_experts(E, site)
    roles = layouts.users(layout, len(weights))
    local = [_local(w, E, group.expert_range(E), f"weights[{i}] ({', '.join(r)})", site)
             for i, (w, r) in enumerate(zip(weights, roles))]
    w_up, w_gate, w_down, *biases = layouts.views(local, layout)
    desc = fingerprint(site, E, k, x, w_up, w_gate, w_down, biases, activation, alpha, limit, capacity_factor)
    offsets = checked(offsets, group_name, desc)
    experts = (local, layout, activation, alpha, limit)
    if capacity_factor > 0:
        return _capacity(x, src, offsets, k, experts, group, El, capacity_factor)
    return _dropless(x, src, offsets, k, experts, group, El)


def _dropless(x, src, offsets, k, experts, group, El):
    ep, (S, H) = group.size, (src.shape[0], x.shape[1])
    counts_E = offsets[1:] - offsets[:-1]                                          # (E,)
    recv_counts = exchange_counts(counts_E, group.name, ep)                        # (ep, El)
    splits = host_splits(torch.cat([counts_E.view(ep, El).sum(1), recv_counts.sum(1)]))
    send, recv = splits[:ep], splits[ep:]
    kept, R = sum(send), sum(recv)
    rows = x[src[:kept] // k]                                                      # (kept, H)
    got = all_to_all(rows, recv, send, group.name, "dispatch")                     # (R, H)
    local_ids = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(ep),
                                        recv_counts.reshape(-1), output_size=R)    # (R,)
    y = _local_experts(got, local_ids, El, experts)                                # (R, H)
    back = all_to_all(y, send, recv, group.name, "combine")                        # (kept, H)
    return torch.cat([back, back.new_zeros(S - kept, H)])


def _local_experts(rows, local_ids, El, experts):
    """Runs this rank's experts on received rows in arrival order: moec.plan regroups them by
    local expert, moec.experts with k=1 reads rows[src], and inv puts results back in arrival order."""
    l_offsets, l_src, l_inv = torch.ops.moec.plan(local_ids[:, None], El)
    return torch.ops.moec.experts(rows, l_src, l_offsets, 1, *experts)[l_inv]


def _capacity(x, src, offsets, k, experts, group, El, capacity_factor):
    """Fixed splits: a (E, C, H) buffer per rank, padded with zero rows; no count exchange."""
    ep, E, (S, H) = group.size, offsets.shape[0] - 1, (src.shape[0], x.shape[1])
    C = capacity(S, E, capacity_factor)
    counts_E = offsets[1:] - offsets[:-1]
    pos = torch.arange(C, device=x.device)
    valid = pos < counts_E[:, None]                                                # (E, C)
    slot = torch.where(valid, offsets[:-1, None] + pos, 0)                         # 0: any in-range slot
    buf = torch.where(valid[..., None], x[src[slot] // k], 0)                      # (E, C, H)
    got = all_to_all(buf.view(E * C, H), None, None, group.name, "dispatch")       # (ep*El*C, H)
    # Arrival order is (source rank, local expert, c); the experts want (local expert, source, c).
    grouped = got.view(ep, El, C, H).transpose(0, 1).reshape(El * ep * C, H)
    n = ep * C
    l_offsets = torch.arange(El + 1, device=x.device) * n
    y = torch.ops.moec.experts(grouped, torch.arange(El * n, device=x.device), l_offsets, 1, *experts)
    y = y.view(El, ep, C, H).transpose(0, 1).reshape(E * C, H)
    back = all_to_all(y, None, None, group.name, "combine")                        # (E*C, H)
    s = torch.arange(S, device=x.device)
    e = torch.searchsorted(offsets, s, right=True) - 1                             # expert of slot s; E if dropped
    p = s - offsets[e]
    keep = (e < E) & (p < C)
    return torch.where(keep[:, None], back[torch.where(keep, e * C + p, 0)], 0)


def capacity(copies: int, num_experts: int, capacity_factor: float) -> int:
    """Rows each rank sends to each expert in capacity mode: ceil(factor * copies / E)."""
    return math.ceil(capacity_factor * copies / num_experts)


def _local(w, E, experts, name, site):
    """This rank's (El, ...) slice of an expert weight, whatever form it came in."""
    if w is None:
        return None
    if isinstance(w, DTensor):
        w = w.to_local()
    lo, hi = experts
    El = hi - lo
    if w.shape[0] == El:
        return w
    if w.shape[0] == E:
        return w[lo:hi]
    raise MoecError(f"expert parallelism{' in ' + site if site else ''}: {name} has {w.shape[0]} experts on "
                    f"this rank; expected {El} (this rank's shard of {E}) or all {E}. Shard expert weights "
                    f"with moec.runtime.shard_experts over the same group the experts run on.")
