"""`shard_experts`: give each rank of the EP group only its experts' weights.

Expert weights become DTensor parameters placed Shard(0) on the EP mesh: their global shape
stays (E, ...), optimizers and distributed checkpoints see DTensors, and each rank stores only
its (E/ep, ...) slice. The model's code is left as written, for full (E, ...) plain tensors, so
the module's class becomes a subclass (`Sharded<Class>`, as FSDP2's `fully_shard` does) in which,
inside `forward`, reading a sharded weight gives it whole:

    forward      one all-gather per sharded weight, in a fixed order (the same collectives on
                 every rank, however often or data-dependently the code reads the weight);
                 backward reduce-scatters its gradient, summed over the ranks' tokens
    compiled     the gather is traced into the graph (`full_tensor` on the DTensor parameter);
                 moec finds the layer through it, and with `ep_group` its expert_parallel pass
                 hands the DTensor to the expert-parallel experts instead: no gather runs
    elsewhere    (initialisation, optimizers, `state_dict`) the DTensor parameter itself

A layer moec does not fuse stays correct: its gathered weights are simply used as they are.
"""
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from moec.codegen.errors import MoecError
from moec.codegen.torch_release import TORCH_RELEASE

from .mesh import resolve_ep_group

_NOT_EXPERTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def shard_experts(model: nn.Module, ep_group, num_experts: int | None = None) -> list:
    """Replace every expert parameter of `model` in place by a DTensor sharded on dim 0 over the EP
    group (a DeviceMesh with an "ep" dimension, a ProcessGroup or "world"); returns their names.

    Expert parameters: those with a leading experts dimension, i.e. of 2 or more dims whose dim 0
    is `num_experts`, or, when it is None, equals the dim 0 of a 3-D parameter of the same module
    (so (E, F) biases go with their (E, F, H) weights). Convolutions are never experts.
    Works on a model built on the meta device: the shards stay on meta, to be materialised with
    `model.to_empty(device=...)` and initialised as usual. Real weights are scattered from the
    group's first rank, so every rank ends up with the same experts whatever its own init.
    """
    group = resolve_ep_group(ep_group)
    names = []
    for mod_name, module in list(model.named_modules()):
        if isinstance(module, _NOT_EXPERTS):
            continue
        params = dict(module.named_parameters(recurse=False))
        lead = num_experts if num_experts is not None else _leading_experts(params)
        sharded = []
        for name, p in params.items():
            if lead is None or isinstance(p, DTensor) or p.dim() < 2 or p.shape[0] != lead:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            group.local_experts(lead, full)
            setattr(module, name, nn.Parameter(_sharded(p, group), requires_grad=p.requires_grad))
            sharded.append(name)
            names.append(full)
        if sharded:
            _gather_in_forward(module, sharded)
    return names


def _leading_experts(params):
    leads = {p.shape[0] for p in params.values() if p.dim() == 3 and not isinstance(p, DTensor)}
    if len(leads) > 1:
        raise MoecError(f"shard_experts: a module has 3-D parameters with different leading sizes {sorted(leads)}; "
                        f"pass num_experts= to say which dimension counts experts")
    return leads.pop() if leads else None


def _sharded(p, group):
    data = p.detach()
    if data.is_meta:
        n = data.shape[0] // group.size
        local = torch.empty((n, *data.shape[1:]), dtype=data.dtype, device="meta")
        return DTensor.from_local(local, group.mesh, [Shard(0)], run_check=False, shape=data.shape,
                                  stride=data.stride())
    return distribute_tensor(data, group.mesh, [Shard(0)])


class ShardedExperts:
    """Mixin of the `Sharded<Class>` subclasses: gathers the sharded weights once per forward.
    `_moec_gathered` holds them while forward runs (an instance attribute, which Dynamo traces
    as a side effect, so code split by a graph break still reads the one gather)."""
    _moec_sharded: tuple = ()          # names of the sharded parameters, set per subclass

    def forward(self, *args, **kwargs):
        self._moec_gathered = {n: _gathered(self._parameters[n]) for n in self._moec_sharded}
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._moec_gathered = None


_SUBCLASSES = {}                       # (class, sharded names) -> its Sharded subclass


def _gather_in_forward(module, names):
    base = getattr(type(module), "_moec_base", type(module))
    names = tuple(sorted(set(names) | set(getattr(type(module), "_moec_sharded", ()))))
    cls = _SUBCLASSES.get((base, names))
    if cls is None:
        attrs = {n: property(_reader(n)) for n in names}
        cls = type(f"Sharded{base.__name__}", (ShardedExperts, base),
                   {**attrs, "_moec_base": base, "_moec_sharded": names})
        _SUBCLASSES[(base, names)] = cls
    module._moec_gathered = None       # present from the start: Dynamo guards on it
    module.__class__ = cls


def _reader(name):
    def read(self):
        gathered = self.__dict__.get("_moec_gathered")
        return gathered[name] if gathered else self._parameters[name]
    return read


def _gathered(p):
    # Partial: each rank's gradient of the full weight covers its own tokens; the sum is the gradient.
    if not isinstance(p, DTensor):
        return p
    if _FULL_TENSOR_TRACES:
        return p.full_tensor(grad_placements=[Partial()])
    n = p.device_mesh.ndim
    return p.redistribute(p.device_mesh, [Replicate()] * n).to_local(grad_placements=[Partial()] * n)


# torch 2.11's Dynamo graph-breaks on full_tensor(grad_placements=[...]) (the placements list is not
# proxied), which splits the MoE layer over two graphs; there redistribute + to_local traces. 2.13's
# traces full_tensor whole, where the other spelling would put the mesh in the graph as an input.
_FULL_TENSOR_TRACES = TORCH_RELEASE >= (2, 13)
