"""Catching ranks that disagree about an MoE layer, at the first step, with a readable error.

Ranks that compiled different MoE configurations (another top-k, activation, capacity factor,
expert width...) would otherwise exchange rows of the wrong sizes and fail deep inside the
transport, or silently compute garbage. `checked(t, group_name, fingerprint)` all-gathers a
description of the layer the first time this rank meets it and raises a MoecError naming the
ranks that differ. It is an opaque op whose output feeds the layer's all-to-alls, so compiled
graphs keep it and run it before them; after the first call it costs one tiny copy.
"""
import torch
import torch.distributed as dist
from torch import Tensor

from moec.codegen.errors import MoecError

# (group name, fingerprint) pairs every rank of the group agreed on. Deciding to check from local
# history is sound because EP already requires every rank to meet the same layers in the same order.
_seen: set = set()


def fingerprint(site: str, num_experts: int, k: int, x: Tensor, w_up: Tensor, w_gate, w_down: Tensor,
                biases, activation: str, alpha: float, limit: float, capacity_factor: float) -> str:
    """What every rank of an EP group must agree on for one MoE layer; plain text, so an error can
    show the difference."""
    F = w_up.shape[1]
    has_bias = "".join("1" if b is not None else "0" for b in biases)
    mode = f"capacity_factor={capacity_factor:g}" if capacity_factor > 0 else "dropless"
    return (f"layer {site or '<unnamed>'}: E={num_experts} k={k} H={x.shape[1]} F={F} gated={w_gate is not None} "
            f"biases={has_bias} act={activation}({alpha:g},{limit:g}) {mode} dtype={str(x.dtype)[6:]}")


@torch.library.custom_op("moec::ep_check", mutates_args=())
def checked(t: Tensor, group_name: str, fingerprint: str) -> Tensor:
    """Returns a copy of t (a small index tensor); on first sight of `fingerprint`, first checks that
    every rank of the group has the same one."""
    key = (group_name, fingerprint)
    if key not in _seen:
        _agree(group_name, fingerprint)
        _seen.add(key)
    return t.clone()


def forget():
    """Check every layer again at its next call (for a process that changes models, e.g. tests)."""
    _seen.clear()


@checked.register_fake
def _(t, group_name, fingerprint):
    return torch.empty_like(t)


def _agree(group_name: str, mine: str):
    group = dist.distributed_c10d._resolve_process_group(group_name)
    everyone = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(everyone, mine, group=group)
    except RuntimeError as e:
        raise MoecError(f"expert parallelism: checking that all ranks of group {group_name!r} compiled the "
                        f"same MoE layer failed ({str(e).strip().splitlines()[0]}); a rank did not reach "
                        f"this layer: check that every rank runs the same model and options") from e
    if any(other != mine for other in everyone):
        lines = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(everyone))
        raise MoecError(f"expert parallelism: the ranks of group {group_name!r} compiled different MoE "
                        f"layers:\n{lines}\nEvery rank must build the same model with the same moec "
                        f"options; fix the rank(s) that differ.")
