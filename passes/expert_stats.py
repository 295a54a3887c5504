"""Pass `expert_stats`: count, on the device, the token copies each MoE layer routes to each expert.

Expects: `moec.plan` nodes (made by `rewrite`), in the root graph or in activation-checkpoint
bodies; `Config.expert_stats` on, else the pass changes nothing.
Guarantees: after each `moec.plan` (offsets (E + 1,) of ids (T, k)), the layer's load buffer
(a buffer of the root GraphModule, owned by `moec.runtime.expert_load`) is bumped by one step:

    step = moec.expert_load_step(offsets, ids)       # (E + 2,): per expert, dropped, 1 call
    moec.expert_load_record(load_buffer, step, w, slot)   # w: the layer's first expert weight

Inside a checkpoint body the step is appended to the body's outputs and recorded in the root
graph, so recomputation in the backward never counts twice. No node reads the device from the
host and no shape is specialised: the counts cost a few tiny device ops per layer and step.
Layers are named by module path relative to the compiled module, read off the path of their
expert weight where Dynamo recorded it (so a layer is named alike inside a checkpoint body).
Must not change: any existing node or value (the counts are a side output).

    for plan in graphs: step := expert_load_step(offsets, ids); lift step to the root;
                        root: expert_load_record(get_attr(load), step, weight, slot)
"""
import operator
import re
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource

from moec.runtime import expert_load

from .detect import _real_inputs, nested_graphs
from .graph import module_path, value

PASS = "expert_stats"


@dataclass(frozen=True)
class ExpertStatsReport:
    layers: tuple    # (module path, slot) of each layer counted, in graph order
    skipped: tuple   # (module path, why) for plan nodes left uncounted


def expert_stats(gm: fx.GraphModule, ctx) -> tuple:
    if not ctx.config.expert_stats:
        return gm, ExpertStatsReport((), ())
    detect = ctx.reports.get("detect")
    regions = {(r.graph, r.logits): r for r in (detect.regions if detect else ())}
    root_real = _real_inputs(gm, ctx.example_inputs)
    root_node = {id(t): n for n, t in root_real.items()}     # real tensor -> root graph input
    layers, skipped = [], []
    for path, sub, real in list(nested_graphs(gm, root_real)):
        for plan in [n for n in sub.graph.nodes if n.target is torch.ops.moec.plan.default]:
            offsets = next((u for u in plan.users if u.target is operator.getitem and u.args[1] == 0), None)
            experts = next((u for u in getattr(offsets, "users", ()) if u.target is torch.ops.moec.experts.default),
                           None)
            owner = _real_base(experts.args[4][0], real) if experts is not None else None
            weight = root_node.get(id(owner))
            owner_path = _source_path(weight)
            layer = _layer_path(_region_name(plan, path, regions), owner_path)
            why = "the plan's offsets feed no moec.experts" if experts is None else _unliftable(gm, path)
            if why:
                skipped.append((layer, why))
                continue
            slot = expert_load.register(layer, owner, owner_path, plan.args[1], value(offsets).device,
                                        ctx.config.expert_stats_log_every)
            _instrument(gm, path, sub, plan, offsets, weight, slot, ctx)
            layers.append((layer, slot))
    gm.graph.lint()
    gm.recompile()
    return gm, ExpertStatsReport(tuple(layers), tuple(skipped))


def _instrument(gm, path, sub, plan, offsets, weight, slot, ctx):
    with sub.graph.inserting_after(offsets):
        step = _node(sub.graph, torch.ops.moec.expert_load_step.default, (offsets, plan.args[0]), plan, ctx)
    sub.recompile()
    step = _lift(gm, path, step)
    attr = _add_buffer(gm, slot)
    # after the other reads of a checkpoint's outputs: a dense backend given partitions (split
    # where moec's ops begin) must not receive the checkpoint's output tuple across a split
    after = max(step.args[0].users, key=_position) if path else step
    with gm.graph.inserting_after(after):
        load = gm.graph.get_attr(attr)
        if ctx.fake_mode is not None:
            load.meta["example_value"] = ctx.fake_mode.from_tensor(expert_load.slot(slot).load)
    with gm.graph.inserting_after(load):
        _node(gm.graph, torch.ops.moec.expert_load_record.default, (load, step, weight, slot), plan, ctx)


def _add_buffer(gm, slot) -> str:
    """Register the slot's load buffer on the root graph, with the source AOT autograd asks of
    every buffer of a Dynamo graph (it lifts buffers into inputs and marks them static)."""
    attr = f"_moec_expert_load_{slot}"
    if not hasattr(gm, attr):
        gm.register_buffer(attr, expert_load.slot(slot).load)
        if hasattr(gm, "_param_name_to_source"):   # a copy: Dynamo's own dict stays as it was
            gm._param_name_to_source = {**gm._param_name_to_source, attr: ConstantSource(f"moec.{attr}")}
    return attr


def _callers(parent, attr):
    return [n for n in parent.graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.HigherOrderOperator)
            and any(isinstance(a, fx.Node) and a.op == "get_attr" and a.target == attr for a in n.args)]


def _unliftable(gm, path) -> str:
    """Why a step made in the body at `path` cannot be passed out to the root ('' if it can)."""
    while path:
        parent_path, _, attr = path.rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        callers = _callers(parent, attr)
        if len(callers) != 1 or not isinstance(getattr(parent, attr).graph.output_node().args[0], (tuple, list)):
            return (f"the layer is inside {attr}, a body called from {len(callers)} places or returning one "
                    f"value: its counts cannot be passed out")
        path = parent_path
    return ""


def _lift(gm, path, node):
    """`node`, made in the body at `path`, as a node of the root graph: appended to the outputs
    of each enclosing body and read back with a getitem after the op that calls it."""
    if not path:
        return node
    parent_path, _, attr = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    body = getattr(parent, attr)
    out = body.graph.output_node()
    index = len(out.args[0])
    out.args = (tuple(out.args[0]) + (node,),)
    body.recompile()
    [caller] = _callers(parent, attr)
    if isinstance(value(caller), (tuple, list)):
        caller.meta["example_value"] = type(value(caller))(list(value(caller)) + [value(node)])
    with parent.graph.inserting_after(caller):
        got = parent.graph.call_function(operator.getitem, (caller, index))
    got.meta.update({"example_value": value(node), "moec_pass": PASS})
    parent.recompile()
    return _lift(gm, parent_path, got)


def _node(graph, target, args, like, ctx):
    node = graph.call_function(target, args)
    node.meta.update({k: like.meta[k] for k in ("nn_module_stack", "stack_trace") if k in like.meta})
    node.meta["moec_pass"] = PASS
    example = None
    if ctx.fake_mode is not None:
        with torch._guards.tracing(torch._guards.TracingContext(ctx.fake_mode)), ctx.fake_mode:
            example = target(*fx.node.map_arg(args, value))
    node.meta["example_value"] = example
    return node


def _position(node) -> int:
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)


def _real_base(node, real):
    """The real tensor a weight node reads: a graph input, or a view of one (in checkpoint bodies)."""
    for _ in range(8):
        if node in real or not isinstance(node, fx.Node) or not node.args:
            break
        node = node.args[0]
    return real.get(node)


def _region_name(plan, path, regions) -> str:
    """The region's module path, as explain and the dumps name it: the region whose router
    logits the plan's ids come from (nearest first), else the plan's own module."""
    todo, seen = deque([(plan, 0)]), set()
    while todo:
        node, depth = todo.popleft()
        region = regions.get((path, node))
        if region is not None:
            return region.module
        if node in seen or depth > 8:
            continue
        seen.add(node)
        todo.extend((n, depth + 1) for n in node.all_input_nodes)
    return module_path(plan)


def _source_path(node) -> str:
    """A graph input's path below the compiled module, from Dynamo's source:
    L['self']._modules['experts']._parameters['gate_up_proj'] -> experts.gate_up_proj ('' if none)."""
    source = getattr(node, "_dynamo_source", None) if node is not None else None
    if source is None:
        return ""
    name = source.name() if callable(source.name) else source.name
    words = ["".join(p) for p in re.findall(r"\['([^']*)'\]|\.(\w+)|\[(\d+)\]", name)][1:]   # [0]: the local
    return ".".join(w for w in words if w not in ("_modules", "_parameters", "_buffers"))


def _layer_path(region: str, owner_path: str) -> str:
    """The layer's path: the ancestor of its expert weight whose path ends with the region's
    (a checkpoint body's module paths may lack the outer modules); the region's if none does."""
    want = region.split(".") if region else []
    module = owner_path.split(".")[:-1]
    for end in range(len(module), len(want) - 1, -1):
        if want and module[end - len(want):end] == want:
            return ".".join(module[:end])
    return region or "<root>"
