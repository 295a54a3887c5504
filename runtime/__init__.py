"""moec's distributed runtime (expert parallelism): process groups, all-to-all, streams.

Runtime never sees FX graphs: passes insert calls to these functions.
    resolve_ep_group(spec)            DeviceMesh ("ep" dim) / ProcessGroup / "world" -> EPGroup
    shard_experts(model, ep_group)    expert weights -> DTensor Shard(0) over the EP group
    ep_experts(...)                   moec.experts with the experts spread over the EP group
"""
from .expert_parallel import ep_experts
from .mesh import EPGroup, resolve_ep_group
from .shard import shard_experts

__all__ = ["EPGroup", "ep_experts", "resolve_ep_group", "shard_experts"]
