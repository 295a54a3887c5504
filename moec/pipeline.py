"""The pass pipeline: the order in which moec's passes run lives here and nowhere else.

A pass is a function `(GraphModule, PassContext) -> (GraphModule, report)`. The runner, not
the passes, logs, times, verifies and records what each pass did.
"""
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from moec.passes.detect import detect
from moec.passes.rewrite import rewrite

from .errors import MoecError
from .log import log

PIPELINE = (
    ("detect", detect),
    ("rewrite", rewrite),
)


@dataclass
class PassContext:
    example_inputs: list
    config: object
    fake_mode: object = None
    reports: dict = field(default_factory=dict)


def run_pipeline(gm: fx.GraphModule, example_inputs, config) -> tuple:
    ctx = PassContext(list(example_inputs), config, _fake_mode(gm))
    for index, (name, fn) in enumerate(PIPELINE):
        if name in config.disable:
            log.info("pass %d %s: disabled by options", index, name)
            continue
        before = len(gm.graph.nodes)
        start = time.perf_counter()
        gm, report = fn(gm, ctx)
        ctx.reports[name] = report
        _verify(gm, name)
        log.info("pass %d %s: %.1f ms, %d -> %d nodes", index, name,
                 1e3 * (time.perf_counter() - start), before, len(gm.graph.nodes))
        if config.stop_after == name:
            log.info("stopping after %s (stop_after)", name)
            break
    return gm, ctx.reports


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
