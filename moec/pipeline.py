"""The pass pipeline: the order in which moec's passes run lives here and nowhere else.

A pass is a function `(GraphModule, PassContext) -> (GraphModule, report)`. The runner, not
the passes, logs, times, verifies and records what each pass did.
"""
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from moec.passes.chunk_tokens import chunk_tokens
from moec.passes.detect import detect
from moec.passes.expert_parallel import expert_parallel
from moec.passes.expert_stats import expert_stats
from moec.passes.fuse_combine import fuse_combine
from moec.passes.fuse_router import fuse_router
from moec.passes.fuse_routing import fuse_routing
from moec.passes.rewrite import rewrite

from .dump import trace_artifact
from .errors import MoecError
from .log import log

PIPELINE = (
    ("detect", detect),                    # find MoE regions, prove their semantics (graph unchanged)
    ("rewrite", rewrite),                  # regions -> moec.route / plan / experts / combine
    ("expert_stats", expert_stats),        # with expert_stats: per-layer expert load counted on the device
    ("expert_parallel", expert_parallel),  # with ep_group: moec.experts -> all-to-all + local experts
    ("chunk_tokens", chunk_tokens),        # with ep_group: each layer pipelined over token chunks
    ("fuse_combine", fuse_combine),        # layers left on one device: experts + combine as one op
    ("fuse_routing", fuse_routing),        # route + plan as one op (one launch at decode sizes)
    ("fuse_router", fuse_router),          # with MOEC_ROUTER_PLAN=1: the router's linear joins it
)


@dataclass
class PassContext:
    example_inputs: list
    config: object
    fake_mode: object = None
    reports: dict = field(default_factory=dict)


def run_pipeline(gm: fx.GraphModule, example_inputs, config, dumper=None) -> tuple:
    """Run the passes in order; log, verify and (with a `moec.dump.Dumper`) dump after each.
    Returns the final graph, the reports by pass name and the pass log (name, ms, nodes before,
    nodes after)."""
    ctx = PassContext(list(example_inputs), config, _fake_mode(gm))
    pass_log = []
    trace_artifact("moec_input_graph", lambda: gm.print_readable(print_output=False))
    if dumper is not None:
        dumper.graph(0, "input", gm)
    for index, (name, fn) in enumerate(PIPELINE, 1):
        if name in config.disable:
            log.info("pass %d %s: disabled by options", index, name)
            continue
        before, code = len(gm.graph.nodes), gm.code
        start = time.perf_counter()
        gm, report = fn(gm, ctx)
        ms = 1e3 * (time.perf_counter() - start)
        ctx.reports[name] = report
        _verify(gm, name)
        pass_log.append((name, ms, before, len(gm.graph.nodes)))
        log.info("pass %d %s: %.1f ms, %d -> %d nodes", index, name, ms, before, len(gm.graph.nodes))
        for module, why in getattr(report, "skipped", ()):   # what a pass left alone, and why
            log.info("pass %s left %s alone: %s", name, module or "<root>", why)
        for line in getattr(report, "log_lines", list)():       # what it chose, in a line each
            log.info("pass %s: %s", name, line)
        changed = gm.code != code
        if changed:   # MLIR's print-after-change, for tlparse
            trace_artifact(f"moec_after_{name}", lambda: gm.print_readable(print_output=False))
        if dumper is not None:
            dumper.graph(index, name, gm, changed)
            if name == "detect":   # the regions' nodes exist only until the rewrite
                dumper.region_pictures(gm, report)
            if name == "chunk_tokens":
                dumper.schedules(report)
        if config.stop_after == name:
            log.info("stopping after %s (stop_after)", name)
            break
    return gm, ctx.reports, pass_log


def _verify(gm, name):
    try:
        gm.graph.lint()
    except Exception as e:
        raise MoecError(f"pass {name!r} left a malformed graph: {e}") from e
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("moec.") and \
                "example_value" not in node.meta and _fake_mode(gm) is not None:
            raise MoecError(f"pass {name!r} created {node.name} ({node.target}) without an example value")


def _fake_mode(gm):
    """The fake mode Dynamo traced with: the one behind the graph's example values (not the
    backend's copy in the TracingContext, which `detect_fake_mode` would prefer)."""
    for node in gm.graph.nodes:
        mode = getattr(node.meta.get("example_value"), "fake_mode", None)
        if mode is not None:
            return mode
    return None
