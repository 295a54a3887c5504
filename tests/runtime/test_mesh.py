"""runtime/mesh.py: the ways to name the expert-parallel group, and the errors for the wrong ones."""
import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moec.codegen.errors import MoecError
from moec.runtime import EPGroup, resolve_ep_group


def test_experts_must_divide_by_group_size():
    g = EPGroup("g", size=4, rank=1, mesh=None)
    assert g.local_experts(8) == 2 and g.expert_range(8) == (2, 4)
    with pytest.raises(MoecError, match="6 experts cannot be split evenly over an expert-parallel group of 4 ranks"):
        g.local_experts(6, "layers.3.mlp")


def test_needs_torch_distributed():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(MoecError, match="init_process_group"):
        resolve_ep_group("world")


def ways_to_name_the_group(rank, ws):
    world = resolve_ep_group("world")
    assert (world.size, world.rank) == (ws, rank)
    assert resolve_ep_group(dist.group.WORLD).name == world.name
    mesh = init_device_mesh("cpu", (2, ws // 2), mesh_dim_names=("dp", "ep"))
    ep = resolve_ep_group(mesh)
    assert (ep.size, ep.rank) == (ws // 2, rank % (ws // 2)) and ep.mesh.ndim == 1
    assert resolve_ep_group(mesh["ep"]).name == ep.name
    with pytest.raises(MoecError, match="none is named 'ep'"):
        resolve_ep_group(init_device_mesh("cpu", (2, ws // 2), mesh_dim_names=("dp", "tp")))
    with pytest.raises(MoecError, match="only 'world'"):
        resolve_ep_group("ep")


def test_ways_to_name_the_group(pool4):
    pool4.run(ways_to_name_the_group)
