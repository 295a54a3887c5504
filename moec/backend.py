"""The `moec` torch.compile backend.

    torch.compile(model, backend="moec", options={...})

Dynamo hands each captured graph here; moec runs its pass pipeline (find the MoE regions,
rewrite them into `torch.ops.moec.*`) and hands the result to the dense backend (Inductor by
default), which compiles everything else as it would without moec.
"""
import logging

import torch
from torch._dynamo.utils import counters

from moec.passes.expert_parallel import layer_checks

from . import session
from .buckets import bucket_plan, bucketed
from .capture import forward_backend_ctx, tracing_context
from .config import Config
from .dense import compile_dense
from .dump import Dumper, trace_artifact
from .errors import MoecError
from .log import log
from .pipeline import run_pipeline


class MoecBackend:
    """Callable backend; `backend_ctx_ctor` is Dynamo's hook for context around tracing."""

    compiler_name = "moec"

    def __init__(self):
        # An instance attribute, so that Dynamo's backend wrappers (which copy __dict__) keep it.
        self.backend_ctx_ctor = tracing_context

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, options=None, mode=None):
        config = Config.from_options(options)
        counters["moec"]["graphs"] += 1
        import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
        from moec.codegen import tuning
        from moec.runtime.cost_model import cache_root
        tuning.load_dir(str(cache_root(config.cache_dir) / "tuning"))   # the user's tuned launch settings
        dumper = Dumper(config.dump_dir) if config.dump_dir else None
        gm, reports, pass_log = run_pipeline(gm, example_inputs, config, dumper)
        plan, buckets = bucket_plan(gm, example_inputs, config, mode, dumper)
        if buckets is not None:
            reports["token_buckets"] = buckets
        session.record(gm, reports)
        _log_regions(reports)
        trace_artifact("moec_regions", lambda: _regions_text(reports))
        checks = layer_checks(gm)
        if dumper is None:
            return _checked_first(bucketed(compile_dense(gm, example_inputs, config, mode), plan), checks)
        if "detect" in reports:
            dumper.regions(reports["detect"], reports.get("rewrite"))
            dumper.kernels(reports["detect"])
        compiled = compile_dense(gm, example_inputs, config, mode, on_aot_graph=dumper.aot_graph,
                                 on_cudagraphs=dumper.cudagraphs, on_backward_report=dumper.backward_report)
        dumper.finish(pass_log)
        return _checked_first(bucketed(compiled, plan), checks)


def _checked_first(compiled, checks):
    """`compiled`, which first has the ranks of each EP group agree on the graph's expert-parallel
    layers (once per process and description): outside the graph, in the order the graphs run,
    which is the same on every rank."""
    if not checks:
        return compiled
    from moec.runtime.consistency import agree_once

    def run(*args):
        for group, text in checks:
            agree_once(group, text)
        return compiled(*args)
    run._boxed_call = getattr(compiled, "_boxed_call", False)   # Dynamo's calling convention, kept
    return run


def _regions_text(reports) -> str:
    from .dump import region_rows, regions_markdown
    detect = reports.get("detect")
    return "detect did not run" if detect is None else regions_markdown(region_rows(detect, reports.get("rewrite")))


def _log_regions(reports):
    """Log each decision and count it in torch._dynamo's counters (tests assert exact counts)."""
    detect = reports.get("detect")
    if detect is None:
        return
    rewritten = set(getattr(reports.get("rewrite"), "rewritten", ()))
    for r in detect.regions:
        fused = r.module in rewritten
        counters["moec"]["regions_fused" if fused else "regions_not_rewritten"] += 1
        log.info("region %s: %s (%s, E=%d, k=%d, %s; %s)", r.module or "<root>",
                 "fused" if fused else "found, not rewritten", r.router.kind, r.num_experts, r.top_k,
                 r.idiom, r.check)
    for m in detect.misses:
        counters["moec"]["regions_missed_" + m.kind] += 1
        # A top-k whose results leave the graph is a miss only if a graph break split a layer there;
        # alone it is more often sampling over logits, so it is logged quietly.
        level = logging.DEBUG if m.kind == "graph_break" else logging.WARNING
        log.log(level, "region %s: missed at %s: %s", m.module or "<root>", m.where, m.reason)


moec_backend = MoecBackend()
forward_backend_ctx()
