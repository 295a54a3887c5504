"""The passes moec runs on AOT autograd's backward graphs, and how each dense backend reaches them.

The backward graph exists only inside AOT autograd, after moec's own pipeline has run on the
forward Dynamo graph, so these passes are reached through the dense backend's compilers:

    hook = backward_hook(config, on_report)      # None where no backward pass is on
    Inductor:   hook.inductor_pass(flags, before) -> a CustomGraphPass that moec/dense.py sets as
                post_grad_custom_post_pass for the whole compile (its uuid then keys Inductor's
                and AOT autograd's caches) and arms only while the backward compiles; the order
                it chooses is pinned with control_deps (see passes/schedule_wgrad.py). A cache
                hit skips post-grad passes: the cached code has the order, but no report is made
    aot_eager:  hook.run(graph, flags) from the bw_compiler of moec's aot_eager (dense.py)
`flags = param_flags(example_inputs)`: per input of the forward as AOT autograd flattens it,
whether it is a parameter; the backward returns one gradient per such input, in order.

Two passes, in this order, on with expert parallelism (Config.ep_group) unless
Config.wgrad_schedule is false or "schedule_wgrad" is in Config.disable:
`split_experts_backward` (off alone with disable=("split_experts_backward",)) splits the
experts' backward into its input-gradient and weight-gradient halves, then `schedule_wgrad`
moves weight gradients under the all-to-alls. schedule_wgrad reads the cost model calibrated
for this device and EP group under Config.cache_dir when one is cached there
(`moec.runtime.load_or_calibrate(device, group)` writes it), else fixed rates per device type
(the report says which). Nothing here measures or communicates while compiling: a rank whose
compile hit a cache would not take part, and the others would wait forever.
"""
import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import _disable_current_modes, is_traceable_wrapper_subclass

from moec.passes import node_costs, schedule_wgrad as wgrad_pass, split_experts_backward as split_pass
from moec.passes.node_costs import NodeCosts, val
from moec.runtime import resolve_ep_group
from moec.runtime.cost_model import AllToAllModel, Calibration, ComputeModel, cache_root, calibration_path

from .dump import trace_artifact
from .log import log

# Rates used where nothing is calibrated: simulate.py's H100 numbers (NVLink all-to-all), and for
# the CPU what `moec.runtime.calibrate` measured on the 2-core CI machine (2 gloo ranks, one
# thread each), rounded.
_DEFAULTS = {
    "cuda": (ComputeModel(750e12, 3000e9, 11e-6), (20e-6, 450e9)),
    "cpu": (ComputeModel(200e9, 30e9, 2e-6), (100e-6, 2e9)),
}


def backward_hook(config, on_report=None):
    """The backward passes `config` turns on, or None. on_report(report) hears each report."""
    if config.ep_group is None or not config.wgrad_schedule or wgrad_pass.PASS in config.disable:
        return None
    return BackwardHook(config, on_report)


class BackwardHook:
    def __init__(self, config, on_report=None):
        self.config, self.on_report = config, on_report
        self.bound = float(config.wgrad_memory_bound_mb) * 2 ** 20

    def run(self, gm, flags, pin: bool = False) -> "BackwardReport":
        """Run the passes on a backward GraphModule in place; pin: bind the order for Inductor."""
        with _disable_current_modes():      # AOT may compile under its fake mode: our numbers are real
            report = self._run(gm, flags, pin)
        if report.split is not None and report.split.split:
            counters["moec"]["experts_backward_split"] += len(report.split.split)
        if report.schedule.moved:
            counters["moec"]["wgrad_ops_moved"] += report.schedule.moved
        log.info("%s", report.summary())
        trace_artifact("moec_wgrad_schedule", report.text)
        if self.on_report is not None:
            self.on_report(report)
        return report

    def _run(self, gm, flags, pin):
        outputs = _outputs(gm.graph)
        if len(outputs) != len(flags):
            return BackwardReport(None, wgrad_pass.ScheduleWGradReport(
                skipped=f"the backward returns {len(outputs)} values for {len(flags)} forward inputs, so its "
                        f"parameter gradients cannot be told apart"))
        split = None
        if split_pass.PASS not in self.config.disable:
            _, split = split_pass.split_experts_backward(gm)
        costs = self.costs(gm.graph)
        _, schedule = wgrad_pass.schedule_wgrad(gm, [i for i, f in enumerate(flags) if f], costs, self.bound)
        if pin and schedule.moved:
            wgrad_pass.pin_order(gm, schedule)
        return BackwardReport(split, schedule)

    def costs(self, graph) -> NodeCosts:
        """The calibration for this device and EP group if one is cached, else this device's
        compute calibration with fixed all-to-all rates, else fixed rates (`source` says which)."""
        device = next((v.device for n in graph.nodes if isinstance(v := val(n), torch.Tensor)), torch.device("cpu"))
        group = dist.distributed_c10d._resolve_process_group(resolve_ep_group(self.config.ep_group).name)
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        compute, (latency, bandwidth) = _DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
        a2a = AllToAllModel(latency, bandwidth, world_size=size)
        grouped, local = self._calibration(device, group), self._calibration(device, None)
        if grouped is not None and grouped[0].all_to_all is not None:
            (cal, path) = grouped
            return NodeCosts(cal.compute, cal.all_to_all, rank, size, f"calibrated ({path})")
        measure = f"; moec.runtime.load_or_calibrate(device, group, cache_dir) measures them into {self._root()}"
        if local is not None:
            return NodeCosts(local[0].compute, a2a, rank, size,
                             f"compute calibrated ({local[1]}), fixed all-to-all rates" + measure)
        return NodeCosts(compute, a2a, rank, size, f"fixed {device.type} rates" + measure)

    def costs_key(self):
        """What `costs` reads, for Inductor's cache key: the calibration files' contents."""
        root = self._root()
        return tuple(sorted((p.name, p.read_text()) for p in root.glob("*.json"))) if root.is_dir() else ()

    def _root(self) -> Path:
        return cache_root(self.config.cache_dir) / "calibration"

    def _calibration(self, device, group):
        path = calibration_path(device, group, self.config.cache_dir)
        return (Calibration.load(path), path) if path.exists() else None

    def inductor_pass(self, flags, before=None):
        """A CustomGraphPass running `run(..., pin=True)` after `before` (a pass already set there),
        while `armed()`."""
        return _inductor_pass_class()(self, flags, before)


@functools.cache
def _inductor_pass_class():
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class InductorPass(CustomGraphPass):
        def __init__(self, hook, flags, before):
            # what was set there before: None, a pass, or (torch >= 2.13) a list of them
            before = () if before is None else tuple(before) if isinstance(before, (list, tuple)) else (before,)
            self.hook, self.flags, self.before, self.on = hook, tuple(flags), before, False

        @contextlib.contextmanager
        def armed(self):
            """Run only inside this (the forward graph goes through the same post-grad passes)."""
            self.on = True
            try:
                yield
            finally:
                self.on = False

        def __call__(self, graph):
            for p in self.before:
                p(graph)
            if self.on:
                self.hook.run(graph.owning_module, self.flags, pin=True)

        def uuid(self):
            # Inductor's FX graph cache keys on this: the pass's code and everything it reads
            before = tuple(p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.before)
            if None in before:
                return None    # a chained pass without a uuid: Inductor must not cache
            files = tuple(os.path.abspath(m.__file__) for m in (wgrad_pass, split_pass, node_costs))
            files += (os.path.abspath(__file__),)
            key = hashlib.sha256(get_hash_for_files(files))
            key.update(repr((self.flags, self.hook.bound, self.hook.costs_key(), before)).encode())
            return key.hexdigest()
    return InductorPass


@dataclass(frozen=True)
class BackwardReport:
    """What the backward passes did to one backward graph."""
    split: object             # passes.split_experts_backward.SplitReport, None where not run
    schedule: object          # passes.schedule_wgrad.ScheduleWGradReport

    def summary(self) -> str:
        split = f"{len(self.split.split)} experts backward split; " if self.split is not None and self.split.split \
            else ""
        return split + self.schedule.summary()

    def text(self) -> str:
        return "\n".join(([self.split.text()] if self.split is not None else []) + [self.schedule.text()])


def param_flags(example_inputs) -> list:
    """Per input as AOT autograd flattens it (a tensor subclass into its inner tensors): whether
    it is a parameter (fake values keep that from the real ones)."""
    flags = []
    for x in example_inputs:
        flags += [isinstance(x, torch.nn.Parameter)] * _leaves(x)
    return flags


def _leaves(x) -> int:
    if not is_traceable_wrapper_subclass(x):
        return 1
    attrs, _ = x.__tensor_flatten__()
    return sum(_leaves(getattr(x, a)) for a in attrs)


def _outputs(graph) -> tuple:
    out = graph.output_node().args[0]
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
