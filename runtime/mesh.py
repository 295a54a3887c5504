"""Turning expert parallelism (EP) on: the expert-parallel group and the checks on it.

Users name the group one way, in `Config.ep_group` or `shard_experts`:
    a DeviceMesh with a dimension named "ep"  (the usual case: mesh = init_device_mesh(..., ("dp", "ep")))
    a 1-D DeviceMesh                          (its only dimension is the EP one)
    a ProcessGroup                            (its ranks form the EP group)
    "world"                                   (every rank; also what MOEC_EP_GROUP=world gives)
and everything below works with an `EPGroup`. Rank r of a group of size ep owns the E/ep
consecutive experts [r*E/ep, (r+1)*E/ep).
"""
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from moec.codegen.errors import MoecError


@dataclass(frozen=True)
class EPGroup:
    """One expert-parallel group, as seen from this rank."""
    name: str            # c10d group name: what graph nodes carry (functional collectives resolve it)
    size: int            # ep
    rank: int            # this rank's index in the group
    mesh: DeviceMesh     # a 1-D mesh over the group, for DTensor placements

    def local_experts(self, num_experts: int, where: str = "") -> int:
        """E/ep, or a MoecError saying how to fix an E that does not divide."""
        if num_experts % self.size:
            at = f" in {where}" if where else ""
            raise MoecError(f"expert parallelism{at}: {num_experts} experts cannot be split evenly over an "
                            f"expert-parallel group of {self.size} ranks; use a group size that divides "
                            f"{num_experts} (e.g. a smaller 'ep' mesh dimension)")
        return num_experts // self.size

    def expert_range(self, num_experts: int) -> tuple:
        """[lo, hi): the global ids of the experts this rank owns."""
        n = self.local_experts(num_experts)
        return self.rank * n, (self.rank + 1) * n


def resolve_ep_group(spec, device_type: str | None = None) -> EPGroup:
    """Turn whatever the user passed as the EP group into an `EPGroup` (see the module docstring)."""
    if not dist.is_available() or not dist.is_initialized():
        raise MoecError("expert parallelism needs torch.distributed: call "
                        "torch.distributed.init_process_group (or init_device_mesh) before compiling")
    if isinstance(spec, str):
        if spec != "world":
            raise MoecError(f"ep_group={spec!r}: as a string only 'world' is understood; pass a DeviceMesh "
                            f"with an 'ep' dimension or a ProcessGroup instead")
        spec = dist.group.WORLD
    if isinstance(spec, DeviceMesh):
        mesh = _ep_submesh(spec)
        group = mesh.get_group()
    elif isinstance(spec, dist.ProcessGroup):
        group = spec
        mesh = DeviceMesh.from_group(group, device_type or _default_device_type())
    else:
        raise MoecError(f"ep_group must be a DeviceMesh, a ProcessGroup or 'world', got {type(spec).__name__}")
    return EPGroup(group.group_name, dist.get_world_size(group), dist.get_rank(group), mesh)


def group_by_name(name: str) -> EPGroup:
    """The `EPGroup` behind a c10d group name, as carried by graph nodes."""
    group = dist.distributed_c10d._resolve_process_group(name)
    return EPGroup(name, dist.get_world_size(group), dist.get_rank(group), None)


def _ep_submesh(mesh: DeviceMesh) -> DeviceMesh:
    names = mesh.mesh_dim_names or ()
    if "ep" in names:
        return mesh["ep"] if mesh.ndim > 1 else mesh
    if mesh.ndim == 1:
        return mesh
    raise MoecError(f"the DeviceMesh has dimensions {names or mesh.ndim} but none is named 'ep'; name the "
                    f"expert-parallel dimension 'ep' (init_device_mesh(..., mesh_dim_names=(..., 'ep')))")


def _default_device_type() -> str:
    # gloo groups live on the CPU; NCCL ones on the accelerator.
    return "cpu" if dist.get_backend() == "gloo" else dist.distributed_c10d._get_pg_default_device().type
