"""Trace code compiled with backend="moec" with Dynamo's dynamic-output capture on.

Expert loops over `range(E)` that select tokens with masks or `torch.where` graph-break under
Dynamo's defaults, which leaves the layer split over several graphs that no pass can fuse. With
`capture_dynamic_output_shape_ops` (and `capture_scalar_outputs`) on while Dynamo traces, the
loop captures as one graph. Dynamo's documented hook for a backend to set such context is the
`backend_ctx_ctor` attribute, but `torch.compile(backend=...)` wraps the backend in an object
that does not forward it (torch/__init__.py `_TorchCompileWrapper`); only
`torch._dynamo.optimize(backend)` honours it. `forward_backend_ctx()` makes Dynamo read the
attribute through that wrapper too. It changes nothing for backends without the attribute.

Hugging Face's "eager" experts implementation loops over the experts that received tokens (a
data-dependent list), which no Dynamo setting can capture. transformers ships interchangeable
implementations of the same experts contract (`ExpertsInterface`); while Dynamo traces for moec,
`_enter_hf_experts_as` has it trace the grouped_mm one instead, through a wrapper whose name marks
every traced node's stack trace (so detection, explain and the logs say so), and leaves eager
execution (and every other backend) untouched. PEFT's LoRA on expert parameters gets the same
treatment (moec/peft_lora.py): its per-forward parametrization graph-breaks, so while Dynamo
traces, the wrapper computes the same adapted weight in traceable code instead.

Under dynamic-output capture a data-dependent op no longer graph-breaks, so code that then reads
its result on the host fails in Dynamo instead. torchtitan's for-loop experts do it:
`bincount(ids, minlength=E).tolist()` (the length is data-dependent: max(E, max(ids) + 1)), then
`torch.split` by the counts. While moec traces, such a `.tolist()` graph-breaks where the data-
dependent length would make Dynamo raise (`tolist_graph_breaks`): the layer then spans two graphs,
and detect reports it missed with the graph break's reason. Known limitation: branching on
`.item()` still fails in Dynamo under this setting; MOEC_CAPTURE_DYNAMIC=0 traces such code
Dynamo's default way.
"""
import contextlib
import functools
import sys
import threading

import torch
import torch._dynamo.eval_frame as eval_frame
import torch.fx.experimental._config as fx_config
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from moec.codegen.torch_release import TORCH_RELEASE
from moec.passes.graph import TRACED_AS_MARKER

from .config import env_value
from .errors import MoecError
from .log import log
from .peft_lora import enter_param_lora_traced, exit_param_lora_traced


def tracing_context():
    """The backend's `backend_ctx_ctor`: Dynamo enters it around every call of a moec-compiled
    function, cache hits included, where nothing is traced. The function swaps (HF's experts
    interface, PEFT's ParamWrapper) stay in force for the whole call: Dynamo guards on their code,
    so a cache lookup without them would miss and recompile. The config switches are entered by
    Dynamo's compile-start callback instead, which runs only when Dynamo does trace (a cache miss)
    inside a marked call, and left by its compile-end callback: entering them on every call cost
    ~35 us (ConfigModule's setattr; 2-core CI machine: a compiled `x + 1` took 56 us against the
    eager backend's 14), the host time of a decode step under CUDA graphs. Where this torch has no
    such callbacks, they are entered here, as before."""
    if not _COMPILE_CALLBACKS:
        return switches()
    return _MarkedCall()


class _MarkedCall:
    """tracing_context's per-call work as one object: the generator-based context managers it was
    built from cost ~21 us a call with transformers imported (2-core CPU machine), this ~5."""
    __slots__ = ("swapped",)

    def __enter__(self):
        _ensure_callbacks()
        _marks.depth = getattr(_marks, "depth", 0) + 1
        try:
            self.swapped = _enter_swaps()
        except BaseException:
            _marks.depth -= 1
            raise

    def __exit__(self, *exc):
        try:
            _exit_swaps(self.swapped)
        finally:
            _marks.depth -= 1


@contextlib.contextmanager
def switches():
    """All of what moec sets while Dynamo traces for it, at once (moec.explain). Options are per
    compile, but this is entered before moec sees any: its switches live in the environment
    (MOEC_CAPTURE_DYNAMIC=0, MOEC_HF_EAGER_EXPERTS_AS=)."""
    with swaps(), config_switches():
        yield


@contextlib.contextmanager
def swaps():
    """Functions Dynamo traces through, swapped for moec's (each acts only while compiling)."""
    swapped = _enter_swaps()
    try:
        yield
    finally:
        _exit_swaps(swapped)


def _enter_swaps():
    """Swap in HF's traced experts implementation and PEFT's traced wrapper -> what `_exit_swaps`
    puts back."""
    hf = _enter_hf_experts_as(env_value("hf_eager_experts_as"))
    try:
        return hf, enter_param_lora_traced()
    except BaseException:
        _exit_hf_experts_as(hf)
        raise


def _exit_swaps(swapped):
    hf, peft = swapped
    try:
        exit_param_lora_traced(peft)
    finally:
        _exit_hf_experts_as(hf)


@contextlib.contextmanager
def config_switches():
    """Dynamo and FX settings for moec's traces."""
    with contextlib.ExitStack() as stack:
        if env_value("capture_dynamic"):
            stack.enter_context(dynamic_capture())
        stack.enter_context(checkpoint_side_effects())
        yield


def _compile_callbacks():
    try:
        from torch._dynamo.callback import CallbackTrigger, callback_handler
    except ImportError:
        return None
    if not hasattr(callback_handler, "start_callbacks") or not hasattr(CallbackTrigger, "DYNAMO"):
        return None
    return callback_handler, CallbackTrigger.DYNAMO


_COMPILE_CALLBACKS = _compile_callbacks()
_marks = threading.local()      # depth: how many moec-compiled calls this thread is inside
_open = {"stack": None}         # the switches entered for the compile in progress


def _on_compile_start(args=None):
    # a trigger other than Dynamo's (a lazily compiled backward, a CUDA graph recording) traces
    # nothing of moec's; torch versions whose callbacks take no arguments have only Dynamo's
    trigger = getattr(args, "callback_trigger", _COMPILE_CALLBACKS[1])
    if getattr(_marks, "depth", 0) and trigger == _COMPILE_CALLBACKS[1] and _open["stack"] is None:
        stack = contextlib.ExitStack()
        stack.enter_context(config_switches())
        _open["stack"] = stack


def _on_compile_end(args=None):
    stack, _open["stack"] = _open["stack"], None
    if stack is not None:
        stack.close()


def _ensure_callbacks():
    # torch._dynamo.reset() clears every registered callback: checked on each call (a list scan)
    handler = _COMPILE_CALLBACKS[0]
    if _on_compile_start not in handler.start_callbacks:
        handler.register_start_callback(_on_compile_start)
        handler.register_end_callback(_on_compile_end)


@contextlib.contextmanager
def _set(module, **values):
    """module.<name> = value for the block, restored after: ConfigModule.patch without its cost
    (it validates and builds a decorator object on every entry)."""
    saved = {name: getattr(module, name) for name in values}
    for name, v in values.items():
        setattr(module, name, v)
    try:
        yield
    finally:
        for name, v in saved.items():
            setattr(module, name, v)


def checkpoint_side_effects():
    """Let Dynamo keep a checkpointed body whose forward has Python side effects in one graph.

    Hugging Face collects router logits (`output_router_logits=True`, needed for the aux loss)
    with forward hooks that append to a list. Inside an activation-checkpoint body that side
    effect makes Dynamo give up on the whole decoder layer ("Failed to handle graph break
    gracefully ... falling back to eager"), so the MoE layer never reaches moec and nothing says
    so. With this switch the side effect happens once, in the forward, and is not replayed by
    the backward's recomputation; in eager the replay finds HF's collector already closed and
    does nothing, so the results are the same."""
    if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return contextlib.nullcontext()
    return _set(torch._dynamo.config, skip_fwd_side_effects_in_bwd_under_checkpoint=True)


@contextlib.contextmanager
def dynamic_capture():
    # backed_size_oblivious: a batch of one token or one sequence must not compile a third graph
    # specialised to size 1 (Dynamo's default), since MoE layers see every token count.
    # capture_scalar_outputs: the expert-parallel rewrite reads dropless split sizes on the host,
    # which AOT autograd can trace only in a shape environment Dynamo made with it on. The cost:
    # user code that branches on `.item()` fails in Dynamo instead of graph-breaking (a known
    # limitation; MOEC_CAPTURE_DYNAMIC=0 turns both off).
    with _set(torch._dynamo.config, capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True), \
            _set(fx_config, backed_size_oblivious=_SIZE_OBLIVIOUS_LOWERS), tolist_graph_breaks():
        yield


# how the graph break's reason starts: moec.explain tells a layer that reads its sizes on the host by it
TOLIST_BREAK = "moec: .tolist() of a tensor whose length depends on its data"


def tolist_graph_breaks():
    """While Dynamo traces: `.tolist()` of a tensor whose length is data-dependent graph-breaks
    (as the op that made it would without dynamic-output capture) instead of raising Dynamo's
    GuardOnDataDependentSymNode from inside its trace, where no backend hook can catch it."""
    try:
        from torch._dynamo.variables.tensor import TensorVariable as variable
    except ImportError:
        variable = None
    original = getattr(variable, "method_tolist", None)
    if original is None:          # a torch that traces tolist elsewhere: its own behaviour stands
        return contextlib.nullcontext()
    return _set(variable, method_tolist=_tolist_breaking(original))


@functools.cache
def _tolist_breaking(original):
    # torch 2.11 and 2.13 differ in the handler's arguments (tx or none): passed through as given
    def method_tolist(self, *args, **kwargs):
        example = self.as_proxy().node.meta.get("example_value")
        if isinstance(example, torch.Tensor) and free_unbacked_symbols(example.shape):
            raise torch._dynamo.exc.Unsupported(
                f"{TOLIST_BREAK} (bincount's, nonzero's): a graph break here, since dynamic-output capture "
                "traced the op that made it")
        return original(self, *args, **kwargs)
    return method_tolist


# torch 2.11's Inductor cannot lower a slice with a negative start on a size-oblivious dimension
# (HF's `hidden_states[:, -1:]` for logits_to_keep=1: LoweringException KeyError
# 'unbacked_bindings', seen on an H100 with torch 2.11); 2.13 lowers it. Where it can't, a batch
# of one token compiles its own graph, as under Dynamo's defaults.
_SIZE_OBLIVIOUS_LOWERS = TORCH_RELEASE >= (2, 13)


def _enter_hf_experts_as(implementation):
    """While Dynamo traces, resolve HF's "eager" experts implementation to `implementation`
    -> (interface, its get_interface before) to restore, or None where nothing was swapped."""
    interface = _hf_experts_interface()
    if interface is None or not implementation:
        return None
    original = interface.get_interface
    if implementation not in interface:
        raise MoecError(f"hf_eager_experts_as={implementation!r} is not an experts implementation of "
                        f"this transformers; known: {sorted(interface.keys())}")
    traced_as = _marked(interface[implementation], implementation)   # built here: Dynamo can't

    def get_interface(experts_implementation, default):
        if experts_implementation == "eager" and torch.compiler.is_compiling():
            return traced_as
        return original(experts_implementation, default)

    interface.get_interface = get_interface
    return interface, original


def _exit_hf_experts_as(swapped):
    if swapped is not None:
        interface, original = swapped
        interface.get_interface = original


@functools.cache
def _marked(forward, implementation):
    # The wrapper's name lands in the stack trace Dynamo records on every node it traces, which
    # is how detection tells (and explain reports) that the layer was traced through the swap;
    # a Python-side record would only be replayed after the backend has run.
    # Cached: Dynamo guards on the wrapper's code object, and the tracing context is entered on
    # every call of the compiled function, so a fresh wrapper per entry recompiled every step.
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)
    wrapper.__name__ = wrapper.__qualname__ = f"{TRACED_AS_MARKER}{implementation}"
    wrapper.__code__ = wrapper.__code__.replace(co_name=wrapper.__name__, co_qualname=wrapper.__name__)
    return wrapper


def _hf_experts_interface():
    module = sys.modules.get("transformers.integrations.moe")
    return getattr(module, "ALL_EXPERTS_FUNCTIONS", None)


def forward_backend_ctx() -> bool:
    """Install the forwarding once; returns whether this torch has the structure it expects."""
    original = eval_frame.get_compiler_fn
    if getattr(original, "_moec_forwards_ctx", False):
        return True
    if not hasattr(torch, "_TorchCompileWrapper"):
        log.warning("moec: torch.compile's backend wrapper not found; expert loops that need dynamic "
                    "capture may graph-break (use torch._dynamo.optimize('moec') instead)")
        return False

    def get_compiler_fn(compiler_fn):
        wrapped = original(compiler_fn)
        inner = getattr(compiler_fn, "compiler_fn", None)
        ctor = getattr(inner, "backend_ctx_ctor", None)
        if isinstance(compiler_fn, torch._TorchCompileWrapper) and ctor is not None \
                and not hasattr(wrapped, "backend_ctx_ctor"):
            wrapped.backend_ctx_ctor = ctor
        return wrapped

    get_compiler_fn._moec_forwards_ctx = True
    eval_frame.get_compiler_fn = get_compiler_fn
    return True
