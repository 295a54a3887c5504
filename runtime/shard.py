"""`shard_experts`: give each rank of the EP group only its experts' weights.

Expert weights become DTensors placed Shard(0) on the EP mesh: their global shape stays
(E, ...) — so moec's detection sees the model it was written as, and optimizers and distributed
checkpoints understand them — while each rank stores only its (E/ep, ...) slice.
"""
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moec.codegen.errors import MoecError

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
    for mod_name, module in model.named_modules():
        if isinstance(module, _NOT_EXPERTS):
            continue
        params = dict(module.named_parameters(recurse=False))
        lead = num_experts if num_experts is not None else _leading_experts(params)
        for name, p in params.items():
            if lead is None or isinstance(p, DTensor) or p.dim() < 2 or p.shape[0] != lead:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            group.local_experts(lead, full)
            setattr(module, name, nn.Parameter(_sharded(p, group), requires_grad=p.requires_grad))
            names.append(full)
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
