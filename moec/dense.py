"""Compile what moec did not rewrite with the dense backend the user chose (`dense_backend`).

Inductor gets the whole graph: it treats `torch.ops.moec.*` as opaque kernels (fake
implementations give it shapes) and fuses the dense code around them. Every other backend —
"eager", "aot_eager", "cudagraphs", torch-tensorrt, a user's callable — gets only the dense
partitions, never a moec node: the graph is split where moec's ops begin and end, each dense
partition is compiled on the fake values Dynamo recorded for its inputs (symbolic shapes), and
moec's ops run between them with their own autograd.

Backward-graph passes (moec/backward.py: weight gradients under the all-to-alls) reach the
backward through Inductor's post-grad custom pass, or through aot_eager's bw_compiler, per
partition; other backends compile their own backward or have none ("eager"), so they run none.
"""
import contextlib
import operator
import unittest.mock

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from torch._dynamo.utils import counters

from .backward import backward_hook, param_flags
from .errors import MoecError
from .log import log

_TENSORRT = ("torch_tensorrt", "tensorrt")


def compile_dense(gm, example_inputs, config, mode=None, on_aot_graph=None, on_cudagraphs=None,
                  on_backward_report=None):
    """`on_aot_graph(kind, gm)` sees forward and backward graphs after AOT autograd (Inductor and
    aot_eager; with aot_eager, one pair per dense partition, the backward as it runs). With a
    CUDA-graph mode ("reduce-overhead"), `on_cudagraphs(kind, text)` hears whether Inductor will
    capture each. `on_backward_report(report)` hears what each backward pass did."""
    backward = backward_hook(config, on_backward_report)
    if config.dense_backend == "inductor":
        return _inductor(gm, example_inputs, mode, on_aot_graph, on_cudagraphs, backward)
    backend = resolve(config.dense_backend, on_aot_graph, backward)
    if not any(is_moec_node(n) for n in gm.graph.nodes):
        return backend(gm, example_inputs)
    return compile_partitions(gm, backend)


def resolve(name, on_aot_graph=None, backward=None):
    """The backend callable for a name or callable; a clear MoecError for one that is not there."""
    if callable(name):
        return name
    if name == "aot_eager" and (on_aot_graph is not None or backward is not None):
        return _aot_eager(on_aot_graph, backward)
    if name in _TENSORRT:
        try:
            import torch_tensorrt  # noqa: F401  (registers its torch.compile backend)
        except ImportError as e:
            raise MoecError(f"dense_backend={name!r} needs torch-tensorrt, which is not installed "
                            f"({e}). Install it with `pip install moec[tensorrt]` (TensorRT's libraries "
                            "come from NVIDIA's package index), or choose another dense_backend") from None
    from torch._dynamo.backends.registry import lookup_backend
    try:
        return lookup_backend(name)
    except Exception as e:
        raise MoecError(f"dense_backend={name!r} is not a torch.compile backend "
                        f"(known: {torch._dynamo.list_backends()}): {e}") from None


def is_moec_node(node) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    if target is operator.getitem:    # an output of a moec op stays with it
        return isinstance(node.args[0], fx.Node) and is_moec_node(node.args[0])
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "moec"


def compile_partitions(gm, backend):
    """Split `gm` into dense and moec partitions; compile each dense one with `backend`."""
    partition, current, last_kind = {}, 0, None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        kind = is_moec_node(node)
        if kind != last_kind:
            current, last_kind = current + 1, kind
        partition[node] = current
    moec_parts = {f"submod_{p}" for n, p in partition.items() if is_moec_node(n)}
    split = split_module(gm, gm, lambda n: partition[n], keep_original_order=True)
    fake_mode = torch._guards.detect_fake_mode(_fake_inputs(gm))
    # Each partition compiles on the example values Dynamo recorded for its inputs (split_module
    # keeps node meta): re-running partitions on fakes would mint fresh unbacked symbols for any
    # data-dependent size (an all-to-all's splits) that the shape environment cannot place.
    # The graph may hold real constant tensors (lifted at trace time): let them mix with fakes.
    with unittest.mock.patch.object(fake_mode, "allow_non_fake_inputs", True), fake_mode:
        for name, submod in list(split.named_children()):
            if name in moec_parts:
                continue
            args = [_example(n) for n in submod.graph.nodes if n.op == "placeholder"]
            single = _tuple_output(submod)
            split.add_submodule(name, _Compiled(backend(submod, args), single))
    return split


def _tuple_output(submod) -> bool:
    """Make a partition return a tuple, as AOT autograd requires; True if it returned one value."""
    out = next(n for n in reversed(submod.graph.nodes) if n.op == "output")
    if isinstance(out.args[0], (tuple, list)):
        return False
    out.args = ((out.args[0],),)
    submod.recompile()
    return True


class _Compiled(torch.nn.Module):
    def __init__(self, fn, single):
        super().__init__()
        self.fn, self.single = fn, single

    def forward(self, *args):
        out = self.fn(*args)
        return out[0] if self.single else out


def _fake_inputs(gm):
    """The graph's inputs as Dynamo traced them: fake tensors and SymInts with symbolic shapes."""
    return [_example(n) for n in gm.graph.nodes if n.op == "placeholder"]


def _example(node):
    v = node.meta.get("example_value", node.meta.get("val"))
    if v is None:
        raise MoecError(f"dense_backend: graph input {node.name} has no example value to compile with")
    return v


def _inductor(gm, example_inputs, mode, on_aot_graph, on_cudagraphs=None, backward=None):
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from .cache_tag import tagged
    patches = tagged(list_mode_options(mode) if mode else {})   # caches keyed on moec's sources too
    wants_cudagraphs = bool(patches.get("triton.cudagraphs"))
    if on_aot_graph is None and not wants_cudagraphs and backward is None:
        return compile_fx(gm, example_inputs, config_patches=patches)
    wgrad = None
    if backward is not None:
        # Inductor's post-grad custom pass, after its own pattern passes, before its scheduler;
        # set for the whole compile so that its uuid keys Inductor's and AOT autograd's caches,
        # armed only while the backward compiles
        wgrad = backward.inductor_pass(param_flags(example_inputs), inductor_config.post_grad_custom_post_pass)
        patches = {**patches, "post_grad_custom_post_pass": wgrad}

    def inner(graph, inputs, *args, **kwargs):
        kind = "backward" if kwargs.get("is_backward") else "forward"
        if on_aot_graph is not None:
            on_aot_graph(kind, graph)
        with wgrad.armed() if wgrad is not None and kind == "backward" else contextlib.nullcontext():
            compiled = compile_fx_inner(graph, inputs, *args, **kwargs)
        if wants_cudagraphs:
            _note_cudagraphs(kind, compiled, kwargs.get("cudagraphs"), on_cudagraphs)
        return compiled
    if on_aot_graph is None:
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=patches)
    # A cache hit would skip AOT autograd and the graphs with it: dumps compile afresh.
    import torch._functorch.config as functorch_config
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches={**patches, "fx_graph_cache": False})


def _note_cudagraphs(kind, compiled, enabled, on_cudagraphs):
    """Whether Inductor will capture this graph in CUDA graphs, and if not why (its own reason:
    a CPU tensor, an input mutation, a dynamic shape it cannot bucket...). Inductor decides in
    compile_fx_inner; the capture itself happens at the first runs."""
    reason = getattr(compiled, "disabled_cudagraphs_reason", None)
    on = bool(enabled) and not reason
    text = "CUDA graphs on (captured at the first runs, replayed after)" if on else \
        f"CUDA graphs off: {reason or 'Inductor disabled them for this graph'}"
    counters["moec"][f"cudagraphs_{'on' if on else 'off'}"] += 1
    log.info("%s graph: %s", kind, text)
    if on_cudagraphs is not None:
        on_cudagraphs(kind, text)


def _aot_eager(on_aot_graph, backward):
    """torch's aot_eager (min-cut partitioner, boxed no-op compilers), showing each forward and
    backward graph to `on_aot_graph` and running the backward passes first."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(graph, _inputs):
        if on_aot_graph is not None:
            on_aot_graph("forward", graph)
        return make_boxed_func(graph.forward)

    def compile_graph(gm, example_inputs):
        flags = param_flags(example_inputs)

        def backward_compiler(graph, _inputs):
            if backward is not None:
                backward.run(graph, flags)
            if on_aot_graph is not None:
                on_aot_graph("backward", graph)
            return make_boxed_func(graph.forward)
        return aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                            partition_fn=min_cut_rematerialization_partition,
                            keep_inference_input_mutations=True)(gm, example_inputs)
    return compile_graph
