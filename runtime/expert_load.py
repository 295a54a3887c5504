"""Expert-load telemetry: per-layer counts of token copies routed to each expert, kept on the device.

Legend: E experts, T tokens, k top-k, S = T*k token copies.

Each MoE layer compiled with `expert_stats` owns one load buffer (E + 2,) int64 on its device:

    load[:E]    copies routed to each expert, summed over forward calls
    load[E]     copies dropped by capacity routing (ids -1, past offsets[E])
    load[E + 1] forward calls counted

Two ops update it, as the `expert_stats` pass inserts them:

    step = moec.expert_load_step(offsets, ids)        # (E + 2,): this call's counts, dropped, 1
    moec.expert_load_record(load, step, owner, slot)  # load += step, in place

The step is functional, so it can be returned out of an activation-checkpoint body; the record
mutates the buffer like BatchNorm's running statistics, which AOT autograd and Inductor keep (the
buffer is a graph attribute, so CUDA graphs see a static address). Neither op reads the device
from the host, except `record` every `log_every` calls while the "moec" logger is at INFO
(TORCH_LOGS=moec): then it reads its layer's buffer and logs one line.

Layers are slots in a process-wide table, keyed by module path and owner, the layer's first
expert weight (held weakly): a recompile of the same layer finds its slot again and keeps
counting into the same buffer; another model, or another instance running the same compiled
graph, gets a slot of its own.
"""
import logging
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moec.codegen.errors import MoecKernelError

log = logging.getLogger("moec")   # moec/log.py registers it with TORCH_LOGS


@dataclass
class LoadSlot:
    layer: str          # module path relative to the compiled module ("<root>": that module itself)
    owner: object       # weakref to the layer's first expert weight, or None
    owner_path: str     # that weight's path relative to the compiled module ("" if unknown)
    load: Tensor        # (E + 2,) int64 on the layer's device
    log_every: int      # log a line every N forward calls (0: never)
    calls: int = 0      # forward calls seen on the host (not under CUDA-graph replay)

    @property
    def num_experts(self) -> int:
        return self.load.shape[0] - 2

    def alive(self) -> bool:
        return self.owner is None or self.owner() is not None


_SLOTS: list = []
_BY_KEY: dict = {}      # (layer, id(owner)) -> slot index; the weakref confirms the id


def register(layer: str, owner, owner_path: str, num_experts: int, device, log_every: int) -> int:
    """The slot of (layer, owner), made if new; its buffer is zero only when new."""
    i = _BY_KEY.get((layer, id(owner)))
    if i is not None and _SLOTS[i].alive() and (_SLOTS[i].owner() if _SLOTS[i].owner else None) is owner:
        s = _SLOTS[i]
        if s.num_experts != num_experts:
            raise MoecKernelError(f"expert stats: layer {layer} was compiled with {s.num_experts} experts "
                                  f"and now with {num_experts}; call moec.reset_stats() after changing it")
        if s.load.device != torch.device(device):   # the model moved: counts move with it, once
            s.load = s.load.to(device)
        s.log_every = log_every
        return i
    _SLOTS.append(LoadSlot(layer, None if owner is None else weakref.ref(owner), owner_path,
                           torch.zeros(num_experts + 2, dtype=torch.int64, device=device), log_every))
    _BY_KEY[(layer, id(owner))] = len(_SLOTS) - 1
    return len(_SLOTS) - 1


def slots() -> list:
    """(display name, LoadSlot) of every layer whose owner is alive, in registration order; a
    layer name met again (another model, or another instance running the same graph) gets #2, #3..."""
    out, seen = [], {}
    for s in _SLOTS:
        if s.alive():
            seen[s.layer] = seen.get(s.layer, 0) + 1
            out.append((s.layer if seen[s.layer] == 1 else f"{s.layer}#{seen[s.layer]}", s))
    return out


def slot(i: int) -> LoadSlot:
    return _SLOTS[i]


@torch.library.custom_op("moec::expert_load_step", mutates_args=())
def expert_load_step(offsets: Tensor, ids: Tensor) -> Tensor:
    """offsets (E + 1,) of moec.plan over ids (T, k) -> (E + 2,) int64: copies per expert, dropped
    copies (S - offsets[E]), 1. Device ops only; S is a shape, not a read."""
    _check_step(offsets, ids)
    E = offsets.shape[0] - 1
    dropped = torch.rsub(offsets[E:], ids.numel())
    return torch.cat([offsets[1:] - offsets[:-1], dropped, torch.ones_like(dropped)])


@expert_load_step.register_fake
def _(offsets, ids):
    _check_step(offsets, ids)
    return offsets.new_empty(offsets.shape[0] + 1, dtype=torch.int64)


@torch.library.custom_op("moec::expert_load_record", mutates_args=("load",))
def expert_load_record(load: Tensor, step: Tensor, owner: Optional[Tensor], slot: int) -> None:
    """load (E + 2,) += step (E + 2,), in place; every `log_every` host calls, a log line.

    `owner` is the layer's first expert weight as this call received it. Dynamo reuses a graph
    for every instance of a module class (a compiled decoder block runs for each layer): when
    `owner` is not the weight the graph was traced with, the call counts into that instance's
    own slot instead, found on the host by identity (no device read)."""
    if slot >= len(_SLOTS):   # code compiled in another process (a warm cache): count, don't log
        load.add_(step)
        return
    s = _SLOTS[slot]
    if s.owner is not None and owner is not None and s.owner() is not owner:
        s = _SLOTS[register(s.layer, owner, s.owner_path, s.num_experts, step.device, s.log_every)]
        load = s.load
    load.add_(step)
    s.calls += 1
    if s.log_every > 0 and s.calls % s.log_every == 0 and log.isEnabledFor(logging.INFO) \
            and not _capturing(step):
        _log_line(s, load)


@expert_load_record.register_fake
def _(load, step, owner, slot):
    if load.shape != step.shape:
        raise MoecKernelError(f"moec.expert_load_record: load {tuple(load.shape)} and step "
                              f"{tuple(step.shape)} must both be (experts + 2,)")


def _log_line(s, load):
    values = load.tolist()   # the one device->host read: only when logging, every log_every calls
    counts, dropped, calls = values[:-2], values[-2], values[-1]
    routed = sum(counts)
    mean = routed / len(counts)
    ratio = f"{max(counts) / mean:.2f}" if mean else "n/a"
    name = next(n for n, other in slots() if other is s)
    log.info("expert load %s: %d calls, %d copies routed, %d dropped, max/mean %s, busiest expert %d, "
             "idlest %d", name, calls, routed, dropped, ratio, counts.index(max(counts)),
             counts.index(min(counts)))
    log.debug("expert load %s per expert: %s", name, counts)


def _capturing(t) -> bool:
    # reading to the host inside a CUDA-graph capture is an error; replays skip the body anyway
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_step(offsets, ids):
    if offsets.dim() != 1 or offsets.dtype != torch.int64 or offsets.shape[0] < 2:
        raise MoecKernelError(f"moec.expert_load_step: offsets must be (experts + 1,) int64, got "
                              f"{offsets.dtype} of shape {tuple(offsets.shape)}")
    if ids.dim() != 2:
        raise MoecKernelError(f"moec.expert_load_step: ids must be (tokens, k), got shape {tuple(ids.shape)}")
