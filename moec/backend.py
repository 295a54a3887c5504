"""The `moec` torch.compile backend.

    torch.compile(model, backend="moec", options={...})

Dynamo hands each captured graph here; moec runs its pass pipeline (find the MoE regions,
rewrite them into `torch.ops.moec.*`) and hands the result to the dense backend (Inductor by
default), which compiles everything else as it would without moec.
"""
import contextlib
import logging

import torch
from torch._dynamo.utils import counters

from . import session
from .capture import dynamic_capture, forward_backend_ctx, hf_experts_as
from .config import Config
from .dump import Dumper, trace_artifact
from .errors import MoecError
from .log import log
from .pipeline import run_pipeline


class MoecBackend:
    """Callable backend; `backend_ctx_ctor` is Dynamo's hook for context around tracing."""

    compiler_name = "moec"

    def __init__(self):
        # An instance attribute, so that Dynamo's backend wrappers (which copy __dict__) keep it.
        self.backend_ctx_ctor = _tracing_context

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, options=None, mode=None):
        config = Config.from_options(options)
        counters["moec"]["graphs"] += 1
        import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
        dumper = Dumper(config.dump_dir) if config.dump_dir else None
        gm, reports, pass_log = run_pipeline(gm, example_inputs, config, dumper)
        session.record(gm, reports)
        _log_regions(reports)
        trace_artifact("moec_regions", lambda: _regions_text(reports))
        if dumper is None:
            return compile_dense(gm, example_inputs, config, mode)
        if "detect" in reports:
            dumper.regions(reports["detect"], reports.get("rewrite"))
            dumper.kernels(reports["detect"])
        compiled = compile_dense(gm, example_inputs, config, mode, on_aot_graph=dumper.aot_graph)
        dumper.finish(pass_log)
        return compiled


@contextlib.contextmanager
def _tracing_context():
    # Options are per compile, but this context is entered before moec sees any: its switches
    # live in the environment (MOEC_CAPTURE_DYNAMIC=0, MOEC_HF_EAGER_EXPERTS_AS=).
    config = Config.from_options()
    with contextlib.ExitStack() as stack:
        if config.capture_dynamic:
            stack.enter_context(dynamic_capture())
        stack.enter_context(hf_experts_as(config.hf_eager_experts_as))
        yield


def compile_dense(gm, example_inputs, config, mode=None, on_aot_graph=None):
    """Compile the rewritten graph with the dense backend named in the config. `on_aot_graph(kind,
    gm)` sees the forward and backward graphs after AOT autograd (Inductor and aot_eager only)."""
    name = config.dense_backend
    if callable(name):
        return name(gm, example_inputs)
    if name == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner
        patches = list_mode_options(mode) if mode else None
        if on_aot_graph is None:
            return compile_fx(gm, example_inputs, config_patches=patches)

        def inner(graph, inputs, *args, **kwargs):
            on_aot_graph("backward" if kwargs.get("is_backward") else "forward", graph)
            return compile_fx_inner(graph, inputs, *args, **kwargs)
        # A cache hit would skip AOT autograd and the graphs with it: dumps compile afresh.
        import torch._functorch.config as functorch_config
        with functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, inner_compile=inner,
                              config_patches={**(patches or {}), "fx_graph_cache": False})
    if name == "aot_eager" and on_aot_graph is not None:
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def recorder(kind):
            return lambda graph, _inputs: (on_aot_graph(kind, graph), make_boxed_func(graph.forward))[1]
        return aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))(gm, example_inputs)
    from torch._dynamo.backends.registry import lookup_backend
    try:
        backend = lookup_backend(name)
    except Exception as e:
        raise MoecError(f"dense_backend={name!r} is not a torch.compile backend "
                        f"(known: {torch._dynamo.list_backends()}): {e}") from None
    return backend(gm, example_inputs)


def _regions_text(reports) -> str:
    from .dump import region_record, regions_markdown
    detect = reports.get("detect")
    if detect is None:
        return "detect did not run"
    rewritten = set(getattr(reports.get("rewrite"), "rewritten", ()))
    rows = [region_record(r, r.module in rewritten) for r in detect.regions]
    rows += [{"module": m.module, "status": "missed", "reason": m.reason, "where": m.where,
              "num_experts": m.num_experts, "top_k": m.top_k} for m in detect.misses]
    return regions_markdown(rows)


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
