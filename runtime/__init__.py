"""moec's distributed runtime (expert parallelism): process groups, all-to-all, streams.

Runtime never sees FX graphs: passes insert calls to these functions.
    resolve_ep_group(spec)            DeviceMesh ("ep" dim) / ProcessGroup / "world" -> EPGroup
    shard_experts(model, ep_group)    expert weights -> DTensor Shard(0) over the EP group
    ep_experts(...)                   moec.experts with the experts spread over the EP group
    AllToAllModel, ComputeModel, Op   cost model; calibrate / load_or_calibrate measure it
    search(LayerCosts, AllToAllModel) chunk count and chunked ops that overlap the all-to-alls
"""
from .cost_model import AllToAllModel, Calibration, ComputeModel, Op, calibrate, load_or_calibrate
from .expert_parallel import ep_experts
from .mesh import EPGroup, resolve_ep_group
from .schedule_search import Event, LayerCosts, Schedule, WGrad, WGradPlacement, predict, search
from .shard import shard_experts

__all__ = ["AllToAllModel", "Calibration", "ComputeModel", "EPGroup", "Event", "LayerCosts", "Op", "Schedule",
           "WGrad", "WGradPlacement", "calibrate", "ep_experts", "load_or_calibrate", "predict",
           "resolve_ep_group", "search", "shard_experts"]
