"""Pass `schedule_wgrad`: run weight gradients while the backward's all-to-alls are in flight.

Expects: an AOT autograd backward graph (ATen ops, fake values in node.meta["val"]) whose
all-to-alls are functional collectives, `_c10d_functional.all_to_all_single` followed later by
its `wait_tensor` (what `moec.runtime.ep_experts` traces to: the backward holds the reversed
dispatch and combine); which outputs are parameter gradients; a `NodeCosts`; a memory bound.
Guarantees: the same nodes computing the same values, in a valid topological order, in which
a weight-gradient op that is ready runs between an all-to-all's start and its wait. A weight-
gradient op is a node whose results flow only into parameter gradients (mm(dy^T, x) of a
linear, a bias's sum, the experts' `experts_wgrad` and the slice-scatters of their gradients);
a unit is one such op that runs a kernel, plus what must move with it: its descendants that
ran before the wait (later, after it) and its ancestors that ran after the wait (earlier, before
it; none may depend on a wait, e.g. the router's backward feeding the gate weight's gradient).
A unit moves *later* (deferred from before the all-to-all, which then starts sooner) or
*earlier* (from after the wait). Each all-to-all's predicted duration is filled greedily,
largest unit that fits first, in program order of the all-to-alls; a move stays only if the
predicted peak memory of the whole order (live storages, views sharing their base's, inputs
freed after their last use) stays within the original peak plus `memory_bound_bytes`.
Must not change: any node's target or arguments, the order of collectives among themselves (so
every rank issues them alike whatever each rank's costs predict), any node already between an
all-to-all and its wait, side-effecting nodes.

    for (start, wait) in all_to_alls, in order:
        slack := comm_s(start) - compute already between start and wait
        while a unit u (a kernel + ancestors after the wait + descendants before it) fits in
              slack and memory:
            move u's nodes just before `wait`; slack -= time(u)

What Inductor already does, and why this pass: Inductor's scheduler keeps collectives in graph
order (`comms.decide_global_ordering_of_comms`) and, by default, picks among topological orders
the one with the least estimated peak memory (`reorder_for_peak_memory`), which knows nothing of
communication. Two opt-in passes overlap it: `reorder_for_compute_comm_overlap` (scheduler
nodes; `torch._inductor.comms` raises collectives and sinks waits) and, in torch >= 2.10, the
post-grad `OverlapScheduler` (`aten_distributed_optimizations.enable_overlap_scheduling`: issues
collectives early and defers waits over independent compute, by roofline or benchmarked
estimates, under a memory cap). Forced to run on this MoE backward (CPU, its GPU-only roofline
stubbed), the OverlapScheduler did hide the second all-to-all behind the router's backward, the
gate weight's gradient and the expert weights' gradient tails, and left the first empty. It is
not usable as moec's default: it is off by default and global (it reorders every collective of
the graph, FSDP's included), its estimates query the GPU's DRAM bandwidth (it fails on CPU/gloo,
and aot_eager never runs it), and it has no notion of all-to-all bytes or of moec's calibrated
EP group. This pass does the part that matters here, with moec's cost model and memory bound,
on every backend that has a backward graph; `pin_order` hands its order to Inductor as
`control_deps` edges (Inductor's own mechanism, fx_passes/control_dependencies.py, used by the
OverlapScheduler the same way), so that `reorder_for_peak_memory` cannot undo it (in the tests
it kept the order unpinned too). Both can be on: this pass runs first (post_grad_custom_post_pass
precedes overlap scheduling in post_grad.py) and the OverlapScheduler respects its edges.
Non-Inductor backends: the pass is plain FX; moec/dense.py runs it from aot_eager's
bw_compiler on each dense partition's backward. There the graph is split at moec's ops, so a
partition holds one layer's all-to-alls and its experts' weight-gradient tails, not the dense
weight gradients of other partitions. "eager" has no backward graph (autograd's engine orders
the backward), so it cannot apply.
"""
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from moec.runtime.schedule_search import format_time

from .graph import op_name
from .node_costs import ALL_TO_ALL, WAIT, is_collective, nbytes, size, tensors, val

PASS = "schedule_wgrad"
_EPS = 1e-12


@dataclass(frozen=True)
class Move:
    nodes: tuple            # node names, in the order they now run (ancestors pulled along first)
    ops: tuple              # their op names, for reading
    time_s: float           # predicted compute time of the unit's nodes
    direction: str          # "later" (was before the all-to-all) or "earlier" (was after its wait)


@dataclass(frozen=True)
class Window:
    collective: str         # the all_to_all_single node
    wait: str
    comm_s: float           # its predicted duration
    busy_s: float           # compute already between it and its wait
    moves: tuple            # Move, in placement order
    hidden_before_s: float  # of comm_s, hidden behind compute in the original order (timeline)
    hidden_after_s: float   # ... and in the new order


@dataclass(frozen=True)
class Event:
    stream: str             # "compute" or "comm"
    label: str
    moved: bool
    start: float
    end: float


@dataclass(frozen=True)
class ScheduleWGradReport:
    windows: tuple = ()
    left: tuple = ()        # ((kernel's node name,), why it stayed)
    peak_before: int = 0    # predicted peak bytes of the original order
    peak_after: int = 0
    memory_bound: float = 0.0
    step_before_s: float = 0.0
    step_after_s: float = 0.0
    timeline_before: tuple = ()
    timeline_after: tuple = ()
    skipped: str = ""       # why nothing was tried ("" when it was)
    cost_source: str = ""

    @property
    def moved(self) -> int:
        return sum(len(m.nodes) for w in self.windows for m in w.moves)

    def summary(self) -> str:
        if self.skipped:
            return f"{PASS}: nothing moved: {self.skipped}"
        hidden = sum(w.hidden_after_s - w.hidden_before_s for w in self.windows)
        filled = sum(1 for w in self.windows if w.moves)
        return (f"{PASS}: {self.moved} weight-gradient ops moved under {filled} of {len(self.windows)} all-to-alls, "
                f"{format_time(hidden)} more communication hidden (predicted step {format_time(self.step_before_s)} -> "
                f"{format_time(self.step_after_s)}), peak memory {self.peak_before} -> {self.peak_after} B "
                f"(bound +{self.memory_bound:.0f} B)")

    def text(self) -> str:
        lines = [self.summary()]
        if self.cost_source:
            lines.append(f"cost model: {self.cost_source}")
        for w in self.windows:
            lines.append(f"\n{w.collective} .. {w.wait}: all-to-all {format_time(w.comm_s)}, "
                         f"{format_time(w.busy_s)} of compute already "
                         f"under it; hidden {format_time(w.hidden_before_s)} -> {format_time(w.hidden_after_s)}")
            for m in w.moves:
                lines.append(f"  moved {m.direction} ({format_time(m.time_s)}): " +
                             ", ".join(f"{n} ({op})" for n, op in zip(m.nodes, m.ops)))
            if not w.moves:
                lines.append("  nothing moved")
        for nodes, why in self.left:
            lines.append(f"left in place: {', '.join(nodes)}: {why}")
        return "\n".join(lines)


def schedule_wgrad(gm: fx.GraphModule, param_outputs, costs, memory_bound_bytes: float = 0.0) -> tuple:
    """param_outputs: indices into the graph's outputs that are parameter gradients; costs: a
    `passes.node_costs.NodeCosts`. -> (gm reordered in place, ScheduleWGradReport)."""
    graph = gm.graph
    original = list(graph.nodes)
    windows = _windows(original)
    if not windows:
        return gm, ScheduleWGradReport(skipped="no all-to-all in this graph", cost_source=costs.source)
    inside = {n for a, w in windows for n in _between(original, a, w)}
    busy = {a: sum(costs.compute_s(n) for n in _between(original, a, w)) for a, w in windows}
    wgrad = weight_gradient_nodes(graph, param_outputs)
    heavy = [n for n in original if n in wgrad and costs.compute_s(n) > 0]     # the kernels worth moving
    left = [((n.name,), "already runs under an all-to-all") for n in heavy if n in inside]
    candidates = [n for n in heavy if n not in inside]
    memory = _Memory(original)
    peak0 = memory.peak(original)
    order, moves, stayed = _fill(original, windows, candidates, wgrad, busy, costs, memory,
                                 peak0 + memory_bound_bytes, fixed=inside | {n for pair in windows for n in pair})
    left += [((n.name,), why) for n, why in stayed]
    before = _timeline(original, costs, windows, set())
    if any(moves.values()):
        _reorder(graph, order)
        gm.recompile()
    after = _timeline(order, costs, windows, {n for ms in moves.values() for m in ms for n in m.nodes})
    report = ScheduleWGradReport(
        tuple(Window(a.name, w.name, costs.comm_s(a), busy[a], tuple(moves.get(a, ())), before.hidden[a],
                     after.hidden[a]) for a, w in windows),
        tuple(left), peak0, memory.peak(order), memory_bound_bytes, before.step_s, after.step_s,
        tuple(before.events), tuple(after.events), cost_source=costs.source)
    return gm, report


def _fill(order, windows, candidates, wgrad, busy, costs, memory, limit, fixed) -> tuple:
    """Greedy: per all-to-all in program order, the largest unit that fits its time left and
    keeps the peak within `limit`, until none does; a unit is a weight-gradient kernel with what
    must move with it (see `_plan`). -> (new order, {start: [Move]}, [(kernel left in place, why)])."""
    candidates, fixed = list(candidates), set(fixed)
    moves = defaultdict(list)
    why_not = defaultdict(dict)      # kernel -> {kind: first reason of that kind}
    for start, wait in windows:
        slack = costs.comm_s(start) - busy[start]
        while slack > _EPS:
            pos = {n: i for i, n in enumerate(order)}
            fits = []
            for c in candidates:
                nodes, reason = _plan(c, start, wait, pos, fixed, wgrad)
                t = sum(costs.compute_s(n) for n in nodes) if nodes else 0.0
                if nodes is None:
                    why_not[c].setdefault("order", reason)
                elif t <= slack + _EPS:
                    fits.append((t, c, nodes))
                else:
                    why_not[c].setdefault("time", f"{format_time(t)} does not fit the {format_time(slack)} left "
                                                  f"under {start.name}")
            placed = None
            for t, c, nodes in sorted(fits, key=lambda f: (-f[0], pos[f[1]])):
                trial = _moved(order, nodes, wait)
                if memory.peak(trial) > limit:
                    why_not[c].setdefault("memory", f"under {start.name} it would raise the predicted peak memory "
                                                    f"past the bound")
                    continue
                direction = "earlier" if pos[c] > pos[wait] else "later"
                moves[start].append(Move(_names(nodes), tuple(op_name(n) for n in nodes), t, direction))
                placed, order, slack = nodes, trial, slack - t
                fixed |= set(nodes)
                break
            if placed is None:
                break
            candidates = [c for c in candidates if c not in placed]
    # the most telling reason: memory, then time, then order (a wait it needs)
    return order, moves, [(c, next((why_not[c][k] for k in ("memory", "time", "order") if k in why_not[c]),
                                   "no all-to-all had time left")) for c in candidates]


def weight_gradient_nodes(graph: fx.Graph, param_outputs) -> set:
    """Nodes whose every use is by another such node or by the output at a parameter gradient's
    index; collectives, waits and side-effecting nodes never count."""
    out = graph.output_node()
    results = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    param_outputs = set(param_outputs)
    at_params = defaultdict(lambda: True)
    for i, r in enumerate(results):
        if isinstance(r, fx.Node):
            at_params[r] = at_params[r] and i in param_outputs
    wgrad = set()
    for node in reversed(graph.nodes):
        if node.op != "call_function" or is_collective(node) or node.target is WAIT or node.is_impure() \
                or not node.users:
            continue
        if all(u in wgrad or (u is out and at_params[node]) for u in node.users):
            wgrad.add(node)
    return wgrad


def pin_order(gm: fx.GraphModule, report: ScheduleWGradReport) -> int:
    """Make the moves binding for Inductor's scheduler: each moved op waits for its all-to-all's
    start, the wait for every moved op (Inductor's control_deps). -> edges added (0 where this
    torch has no control_deps)."""
    try:
        from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
    except ImportError:
        return 0
    by_name = {n.name: n for n in gm.graph.nodes}
    deps = {}
    for w in report.windows:
        ops = [by_name[n] for m in w.moves for n in m.nodes
               if by_name[n].op == "call_function" and isinstance(by_name[n].target, torch._ops.OpOverload)]
        if not ops:
            continue
        start, wait = by_name[w.collective], by_name[w.wait]
        for n in ops:
            deps[n] = {start}
        deps[wait] = set(ops)
    if deps:
        preserve_node_ordering(gm.graph, deps)
        gm.recompile()
    return sum(len(d) for d in deps.values())


def _windows(order) -> list:
    """(all_to_all_single, its wait_tensor) pairs, in program order."""
    pairs = []
    for n in order:
        if n.target is ALL_TO_ALL:
            wait = next((u for u in n.users if u.target is WAIT), None)
            if wait is not None:
                pairs.append((n, wait))
    return pairs


def _between(order, a, b) -> list:
    i, j = order.index(a), order.index(b)
    return order[i + 1:j]


def _plan(kernel, start, wait, pos, fixed, wgrad):
    """The nodes to put just before `wait` for `kernel` (a weight-gradient node) to run there:
    itself, every ancestor now after the wait (it must run earlier, so none may depend on a wait)
    and every descendant now before the wait (it must run later; all are weight-gradient nodes).
    Each must be free to move: no collective, wait or side effect, not already placed or under an
    all-to-all. -> (nodes in program order, "") or (None, why not)."""
    if pos[start] < pos[kernel] < pos[wait]:
        return None, "already under this all-to-all"
    members, stack = {kernel}, list(kernel.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in members or pos[n] < pos[wait]:
            continue
        if not _free(n, fixed):
            return None, f"needs {n.name}, which depends on an all-to-all that has not finished there"
        members.add(n)
        stack.extend(n.all_input_nodes)
    stack = list(kernel.users)
    while stack:
        n = stack.pop()
        if n in members or n.op == "output" or pos[n] > pos[wait]:
            continue
        if n not in wgrad or not _free(n, fixed):
            return None, f"its result is read by {n.name}, which already runs under an all-to-all"
        members.add(n)
        stack.extend(n.users)
    return sorted(members, key=pos.__getitem__), ""


def _free(n, fixed) -> bool:
    return n.op == "call_function" and n not in fixed and not is_collective(n) and n.target is not WAIT \
        and not n.is_impure()


def _moved(order, nodes, before) -> list:
    moving = set(nodes)
    rest = [n for n in order if n not in moving]
    i = rest.index(before)
    return rest[:i] + list(nodes) + rest[i:]


def _reorder(graph, order):
    """Relink the graph's nodes in `order` (a topological order of the same nodes)."""
    out = graph.output_node()
    for n in order:
        if n is not out:
            out.prepend(n)
    graph.lint()


class _Memory:
    """Predicted live bytes along an order: a storage is allocated by the node that first yields
    it and freed after the last node reading any value on it; graph inputs are live from the start
    and freed after their last use; outputs live to the end. wait_tensor yields its input."""

    def __init__(self, order):
        self.storages, self.nbytes, self.inputs, self.outputs = {}, {}, set(), set()
        for n in order:
            if n.op == "output":
                for i in n.all_input_nodes:
                    self.outputs |= self.storages.get(i, set())
                continue
            if n.target is WAIT:
                self.storages[n] = set(self.storages.get(n.args[0], set()))
                continue
            keys = set()
            for t in tensors(val(n)):
                key = t.untyped_storage()._cdata
                keys.add(key)
                self.nbytes.setdefault(key, size(t.untyped_storage().nbytes()) if _sized(t) else nbytes(t))
            self.storages[n] = keys
            if n.op == "placeholder":
                self.inputs |= keys

    def peak(self, order) -> int:
        last, made = {}, {}
        for i, n in enumerate(order):
            for key in self.storages.get(n, ()):
                made.setdefault(key, i)
                last.setdefault(key, i)
            for inp in n.all_input_nodes:
                for key in self.storages.get(inp, ()):
                    last[key] = i
        frees = defaultdict(list)
        for key, i in last.items():
            if key not in self.outputs:
                frees[i].append(key)
        live = sum(self.nbytes[k] for k in self.inputs)
        peak = live
        for i, n in enumerate(order):
            if n.op != "placeholder":
                live += sum(self.nbytes[k] for k in self.storages.get(n, ()) if made.get(k) == i)
            peak = max(peak, live)
            live -= sum(self.nbytes[k] for k in frees[i])
        return peak


def _sized(t) -> bool:
    try:
        t.untyped_storage().nbytes()
        return True
    except Exception:      # a storage of unknown size (unbacked): count the tensor's own bytes
        return False


@dataclass
class _Timeline:
    events: list
    hidden: dict
    step_s: float


def _timeline(order, costs, windows, moved) -> _Timeline:
    """Two in-order streams: compute runs the nodes; an all-to-all starts on the comm stream when
    issued (and the previous one is done) and its wait holds compute until it ends."""
    starts = {a for a, _ in windows}
    wait_of = {w: a for a, w in windows}
    t, comm_free, end, hidden, events = 0.0, 0.0, {}, {}, []
    for n in order:
        if n in starts:
            s = max(t, comm_free)
            end[n] = comm_free = s + costs.comm_s(n)
            events.append(Event("comm", n.name, False, s, end[n]))
        elif n in wait_of:
            a = wait_of[n]
            hidden[a] = max(0.0, costs.comm_s(a) - max(0.0, end[a] - t))
            hidden[a] = hidden[a] if hidden[a] > _EPS else 0.0
            t = max(t, end[a])
        else:
            d = costs.compute_s(n)
            if d > 0:
                events.append(Event("compute", n.name, n.name in moved, t, t + d))
                t += d
    return _Timeline(events, hidden, max(t, comm_free))


def _names(nodes) -> tuple:
    return tuple(n.name for n in nodes)
