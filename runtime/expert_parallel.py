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

`ep_experts` is these steps back to back. They are also callable one by one, the all-to-alls
started by one call and waited for by another, so a pass can put compute between the two:
    ds    = ep_dispatch(x, src, offsets, ...)          counts, host splits, start the dispatch
    got   = ep_wait(d.rows)                             for each d in ds (capacity: pieces of C)
    y     = ep_local_experts(got, d, weights, ...)
    back  = ep_wait(ep_combine(y, d))                   start the combine ... wait for it
    out   = ep_collect(ds, backs)                       (S, H), as ep_experts returns it
"""
import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.tensor import DTensor

from moec.codegen import layout as layouts
from moec.codegen.errors import MoecError

from .all_to_all import all_to_all_start, exchange_counts, host_splits, wait
from .consistency import agree_once, describe, tag
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

    It is the stages below run back to back, each all-to-all waited for at once; the pass
    `chunk_tokens` calls the stages itself to overlap the exchanges with compute.
    """
    experts = (weights, layout, activation, alpha, limit)
    dispatches = ep_dispatch(x, src, offsets, k, *experts, group_name, capacity_factor, site)
    backs = [ep_wait(ep_combine(ep_local_experts(ep_wait(d.rows), d, *experts, site), d)) for d in dispatches]
    return ep_collect(dispatches, backs)


class Dispatch(NamedTuple):
    """One dispatched piece, as `ep_dispatch` leaves it for the later stages of its chunk."""
    rows: Tensor               # (R, H) rows arriving from every rank; in flight until `ep_wait`
    send: list | None          # rows this rank sends each rank (host ints); None: equal blocks
    recv: list | None          # rows each rank sends this rank
    local_ids: Tensor | None   # dropless: (R,) the local expert of each arriving row
    group_name: str
    ep: int
    El: int                    # experts per rank
    copies: int                # S: rows of the layer's (S, H) output
    offsets: Tensor | None     # capacity: (E+1,) the layer's grouped offsets, for `ep_collect`
    capacity: int              # capacity: C, the slots per (rank, expert) of the whole layer; 0: dropless
    k: int


def ep_dispatch(x: Tensor, src: Tensor, offsets: Tensor, k: int, weights: list, layout: str, activation: str,
                alpha: float, limit: float, group_name: str, capacity_factor: float = 0.0, site: str = "",
                pieces: int = 1, chunk: str = "") -> tuple:
    """Send this rank's token copies (x, src, offsets as `ep_experts` takes them) to the ranks owning
    their experts and return at once, the rows still in flight: a tuple of `Dispatch`es.

    Dropless: exchanges the per-expert counts (waited: the split sizes must reach the host, the
    one device->host sync), then starts one all-to-all; `pieces` must be 1 (the pass chunks tokens
    instead, each chunk with its own counts). Capacity: builds the padded (E, C, H) buffer and
    starts `pieces` all-to-alls of (E, C_j, H), the slots cut into pieces along C, so the experts
    of piece j can run while piece j+1 travels. `chunk` names this call's place in a chunked layer
    ("tokens 1/3"); ranks check that they agree on it along with the layer itself: here in eager,
    before the graph's first run where compiled (see `consistency`).
    """
    group = group_by_name(group_name)
    E = offsets.shape[0] - 1
    El = group.local_experts(E, site)
    if not is_fake(offsets):
        agree_once(group_name, describe(site, x, offsets, k, _localized(weights, layout, E, group, site), layout,
                                        activation, alpha, limit, capacity_factor, chunk))
    if capacity_factor > 0:
        return _capacity_dispatch(x, src, offsets, k, group, El, capacity_factor, pieces)
    if pieces != 1:
        raise MoecError(f"ep_dispatch{' in ' + site if site else ''}: pieces={pieces} in dropless mode; "
                        f"chunk the tokens instead (one ep_dispatch per chunk)")
    ep, S = group.size, src.shape[0]
    counts_E = offsets[1:] - offsets[:-1]                                          # (E,)
    recv_counts, strangers = exchange_counts(counts_E, group.name, ep, tag(site, chunk))   # (ep, El), ()
    splits = host_splits(torch.cat([counts_E.view(ep, El).sum(1), recv_counts.sum(1), strangers[None]]))
    send, recv = splits[:ep], splits[ep:-1]
    torch._check(splits[-1] == 0, lambda: f"ep_dispatch{' in ' + site if site else ''}: the count exchange of "
                 f"{chunk or 'this layer'} met another layer or chunk on {splits[-1]} rank(s): the ranks' "
                 f"collectives are out of step (a rank skipped or merged one)")
    kept, R = sum(send), sum(recv)
    empty = isinstance(S, int) and S == 0       # slicing it would mint a size nothing uses
    if not empty:
        # Stated, so the slice's size is `kept` itself: unproven, tracing mints a fresh unbacked size
        # for it, which Inductor's re-propagation (it knows 0 <= kept <= S by then) cannot rebind
        torch._check(kept >= 0)
        torch._check(kept <= S)
    rows = x[(src if empty else src[:kept]) // k]                                  # (kept, H)
    local_ids = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(ep),
                                        recv_counts.reshape(-1), output_size=R)    # (R,)
    pending = all_to_all_start(rows, recv, send, group.name, ep)                   # (R, H)
    return (Dispatch(pending, send, recv, local_ids, group.name, ep, El, S, None, 0, k),)


def _capacity_dispatch(x, src, offsets, k, group, El, capacity_factor, pieces):
    """Fixed splits: a (E, C, H) buffer per rank, padded with zero rows; no count exchange."""
    ep, E, (S, H) = group.size, offsets.shape[0] - 1, (src.shape[0], x.shape[1])
    C = capacity(S, E, capacity_factor)
    counts_E = offsets[1:] - offsets[:-1]
    pos = torch.arange(C, device=x.device)
    valid = pos < counts_E[:, None]                                                # (E, C)
    slot = torch.where(valid, offsets[:-1, None] + pos, 0)                         # 0: any in-range slot
    buf = torch.where(valid[..., None], x[src[slot] // k], 0)                      # (E, C, H)
    return tuple(Dispatch(all_to_all_start(part.reshape(-1, H), None, None, group.name, ep),  # (ep*El*C_j, H)
                          None, None, None, group.name, ep, El, S, offsets, C, k)
                 for part in buf.tensor_split(pieces, dim=1))


def ep_wait(t: Tensor) -> Tensor:
    """The rows of a dispatch (`Dispatch.rows`) or a combine, once they have arrived."""
    return wait(t, "all-to-all")


def ep_local_experts(rows: Tensor, d: Dispatch, weights: list, layout: str, activation: str, alpha: float,
                     limit: float, site: str = "") -> Tensor:
    """This rank's experts on the rows of dispatch `d` (after `ep_wait`), in arrival order: (R, H)."""
    group = group_by_name(d.group_name)
    experts = (_localized(weights, layout, d.ep * d.El, group, site), layout, activation, alpha, limit)
    if d.capacity:
        return _capacity_experts(rows, d, experts)
    return _local_experts(rows, d.local_ids, d.El, experts)


def ep_combine(y: Tensor, d: Dispatch) -> Tensor:
    """Start sending the expert outputs of dispatch `d` back where their rows came from; `ep_wait`
    gives them, (kept, H) in this rank's slot order (capacity: (E*C_j, H))."""
    return all_to_all_start(y, d.send, d.recv, d.group_name, d.ep)


def ep_collect(dispatches: tuple, backs: list) -> Tensor:
    """The layer's (S, H) output, grouped by expert, from the arrived combines of its dispatches:
    dropless pads the dropped tail with zero rows; capacity reassembles the pieces' slots."""
    d = dispatches[0]
    if d.capacity:
        return _capacity_collect(d, backs)
    back, = backs
    return torch.cat([back, back.new_zeros(d.copies - back.shape[0], back.shape[1])])


def _local_experts(rows, local_ids, El, experts):
    """Runs this rank's experts on received rows in arrival order: moec.plan regroups them by
    local expert, moec.experts with k=1 reads rows[src], and inv puts results back in arrival order."""
    l_offsets, l_src, l_inv = torch.ops.moec.plan(local_ids[:, None], El)
    return _experts(rows, l_src, l_offsets, experts)[l_inv]


def _experts(x, src, offsets, experts):
    """moec.experts with k=1; in training moec.experts_save, whose backward reads the forward's
    pre-activations instead of recomputing two of its GEMMs."""
    weights = experts[0]
    training = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
    if training:
        return torch.ops.moec.experts_save(x, src, offsets, 1, *experts)[0]
    return torch.ops.moec.experts(x, src, offsets, 1, *experts)


def _capacity_experts(got, d, experts):
    """Arrival order is (source rank, local expert, c); the experts want (local expert, source, c)."""
    ep, El, H = d.ep, d.El, got.shape[1]
    C = got.shape[0] // (ep * El)
    grouped = got.view(ep, El, C, H).transpose(0, 1).reshape(El * ep * C, H)
    n = ep * C
    l_offsets = torch.arange(El + 1, device=got.device) * n
    y = _experts(grouped, torch.arange(El * n, device=got.device), l_offsets, experts)
    return y.view(El, ep, C, H).transpose(0, 1).reshape(ep * El * C, H)


def _capacity_collect(d, backs):
    E, C, S, offsets = d.ep * d.El, d.capacity, d.copies, d.offsets
    H = backs[0].shape[1]
    back = torch.cat([b.view(E, -1, H) for b in backs], dim=1).view(E * C, H)    # (E*C, H)
    s = torch.arange(S, device=back.device)
    e = torch.searchsorted(offsets, s, right=True) - 1                             # expert of slot s; E if dropped
    p = s - offsets[e]
    keep = (e < E) & (p < C)
    return torch.where(keep[:, None], back[torch.where(keep, e * C + p, 0)], 0)


def capacity(copies: int, num_experts: int, capacity_factor: float) -> int:
    """Rows each rank sends to each expert in capacity mode: ceil(factor * copies / E)."""
    return math.ceil(capacity_factor * copies / num_experts)


def _localized(weights, layout, E, group, site):
    """Each base weight as this rank's (El, ...) slice."""
    roles = layouts.users(layout, len(weights))
    return [_local(w, E, group.expert_range(E), f"weights[{i}] ({', '.join(r)})", site)
            for i, (w, r) in enumerate(zip(weights, roles))]


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
