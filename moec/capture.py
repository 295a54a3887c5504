"""Trace code compiled with backend="moec" with Dynamo's dynamic-output capture on.

Expert loops over `range(E)` that select tokens with masks or `torch.where` graph-break under
Dynamo's defaults, which leaves the layer split over several graphs that no pass can fuse. With
`capture_dynamic_output_shape_ops` and `capture_scalar_outputs` on while Dynamo traces, the
loop captures as one graph. Dynamo's documented hook for a backend to set such context is the
`backend_ctx_ctor` attribute, but `torch.compile(backend=...)` wraps the backend in an object
that does not forward it (torch/__init__.py `_TorchCompileWrapper`); only
`torch._dynamo.optimize(backend)` honours it. `forward_backend_ctx()` makes Dynamo read the
attribute through that wrapper too. It changes nothing for backends without the attribute.
"""
import contextlib

import torch
import torch._dynamo.eval_frame as eval_frame

from .log import log


@contextlib.contextmanager
def dynamic_capture():
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        yield


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
