"""Pass `expert_parallel`: spread each MoE layer's experts over the expert-parallel group.

Expects: `moec.experts` nodes (made by `rewrite`); `Config.ep_group` set, else the pass changes
nothing; torch.distributed initialised on every rank of the group.
Guarantees: each `moec.experts` node becomes a call to `moec.runtime.ep_experts` with the same
arguments plus the group's name, `Config.ep_capacity_factor` and the layer's module path. Its
output keeps the contract of `moec.experts` ((T*k, H), grouped by expert), so `moec.combine`
and everything downstream run unchanged. A weight the graph all-gathers from a DTensor input
(`dt.full_tensor()`, how `shard_experts` modules read their weights) is handed over as the
DTensor, whose local shard is all ep_experts reads; the gather, then unread, is erased. A layer
whose E the group size does not divide is an error (every rank must place the same experts),
not a miss.
Must not change: any other node.

    for node in graph: if node is moec.experts(*args):
        weights := [dt if w is dt.full_tensor() else w for w in weights]
        node := ep_experts(*args, group_name, capacity_factor, site=module path)
"""
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.distributed.tensor import Shard

from moec.runtime import ep_experts, resolve_ep_group
from moec.runtime.consistency import describe
from moec.runtime.expert_parallel import ep_dispatch

from .graph import gather_chain, gathered_dtensor, value

PASS = "expert_parallel"
WHOLE_LAYER = "moec_whole_layer"    # meta of a chunk's ep_dispatch (chunk_tokens): the layer's (x, offsets) values


@dataclass(frozen=True)
class ExpertParallelReport:
    group: str          # c10d group name ("" when expert parallelism is off)
    size: int           # ranks in the group
    layers: tuple       # module paths of the layers now expert-parallel, in graph order
    sharded: tuple = ()  # DTensor inputs handed over as their shards (their gathers erased), by node name


def expert_parallel(gm: fx.GraphModule, ctx) -> tuple:
    spec = ctx.config.ep_group
    if spec is None:
        return gm, ExpertParallelReport("", 1, ())
    group = resolve_ep_group(spec)
    capacity_factor = float(ctx.config.ep_capacity_factor)
    layers, sharded = [], []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.moec.experts.default:
            continue
        site = _module_path(node)
        offsets = node.args[2]
        num_experts = offsets.meta["example_value"].shape[0] - 1 if "example_value" in offsets.meta else None
        if num_experts is not None:
            group.local_experts(int(num_experts), site)
        x, src, offsets, k, weights, *rest = node.args
        local = [_shard_of(w, group) or w for w in weights]
        with gm.graph.inserting_before(node):
            ep = gm.graph.call_function(ep_experts, (x, src, offsets, k, local, *rest, group.name),
                                        {"capacity_factor": capacity_factor, "site": site})
        ep.meta.update(node.meta)      # same output: the example value and provenance carry over
        ep.meta["moec_pass"] = PASS
        node.replace_all_uses_with(ep)
        gm.graph.erase_node(node)
        for w, shard in zip(weights, local):
            if shard is not w:
                sharded.append(shard.name)
                for g in gather_chain(w):    # the gather's nodes nothing reads any more
                    if not g.users:
                        gm.graph.erase_node(g)
        layers.append(site)
    gm.graph.lint()
    gm.recompile()
    return gm, ExpertParallelReport(group.name, group.size, tuple(layers), tuple(sharded))


def _shard_of(weight, group):
    """The DTensor `weight` gathers, if it is sharded Shard(0) over exactly this EP group (so its
    local shard holds this rank's experts); else None, and the gathered weight is used as it is."""
    source = gathered_dtensor(weight)
    dt = source.meta.get("example_value") if source is not None else None
    if dt is None or tuple(dt.placements) != (Shard(0),) or dt.device_mesh.ndim != 1:
        return None
    return source if dt.device_mesh.get_group().group_name == group.name else None


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else node.name


def layer_checks(gm: fx.GraphModule) -> list:
    """[(group name, text)]: per EP group, in graph order, the description of every expert-parallel
    layer (and chunk) in `gm`, for the ranks to agree on before the graph first runs (the check is
    a blocking collective, kept out of the graph: see `moec.runtime.consistency`)."""
    texts = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (ep_experts, ep_dispatch):
            continue
        x, _, offsets, k, weights, layout, activation, alpha, limit, group = node.args
        kw = node.kwargs
        x, offsets = node.meta.get(WHOLE_LAYER) or (value(x), value(offsets))
        texts.setdefault(group, []).append(
            describe(kw.get("site", ""), x, offsets, k, [value(w) for w in weights], layout,
                     activation, alpha, limit, kw.get("capacity_factor", 0.0), kw.get("chunk", "")))
    return [(group, "; ".join(t)) for group, t in texts.items()]
