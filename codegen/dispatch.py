"""How moec's ops are registered: `torch.library.custom_op` (schema from the annotations, fake and
autograd registrations, trace-time checks), plus the same function as the op's CUDA kernel,
registered with the dispatcher directly, and an autograd kernel that calls it straight away where
no gradient is wanted.

Why: custom_op's own backend kernel is a Python wrapper around the function (pytree handling, an
aliasing check of the outputs against the inputs, Dynamo disabled around it) that cost 20-25 us
per call on top of the function on this repository's CPU machine, paid by every op of every
layer on every step without CUDA graphs. On CUDA tensors the dispatcher now calls the function,
with Dynamo disabled around it as custom_op does (~0.5 us: an op called from eager code while a
compiled function runs must not have its Python traced); CPU tensors (CI, the reference path)
keep custom_op's wrapper and its aliasing check, which every op's tests pass through.

The autograd kernel: custom_op's (torch/_library/autograd.py) takes every call, also under
no_grad, and there re-enters the dispatcher below autograd, which boxes the arguments into Python
a second time: ~30 us of a decode step's ~160 us experts_combine call (2-core CPU machine, launches
stubbed). Where no input needs a gradient and the call would go next to a kernel of ours (real CUDA
tensors, no mode or subclass in between: fake tensors, functionalization and dispatch modes all put
their own key there), ours calls that function itself; anything else goes to custom_op's kernel.
"""
import inspect
import warnings

import torch
from torch import _C

_LIB = torch.library.Library("moec", "IMPL")
# dispatch keys whose kernel is the op's function itself (registered below): the autograd kernel's
# shortcut calls the function where the call would go to one of these next
_DIRECT = {_C.DispatchKey.CUDA}
# torch 2.11's Library.impl refuses to replace a kernel registered from Python unless told it may
_OVERRIDE = {"allow_override": True} if "allow_override" in inspect.signature(torch.library.Library.impl).parameters \
    else {}


def moec_op(name):
    """@moec_op("route") def route(...): torch.ops.moec.route, with no mutated arguments."""
    def register(fn):
        op = torch.library.custom_op(f"moec::{name}", mutates_args=())(fn)
        _LIB.impl(name, torch.compiler.disable(fn), "CUDA")
        _shortcut_autograd(name, op, fn)
        return op
    return register


def goes_direct(keyset) -> bool:
    """Whether a call that reached the autograd key with `keyset` would next run one of our direct
    kernels (the in-place/view key is a fallthrough for ops that mutate nothing)."""
    rest = (keyset & _C._after_autograd_keyset).remove(_C.DispatchKey.ADInplaceOrView)
    return rest.highestPriorityTypeId() in _DIRECT


_slow: dict = {}     # op name -> custom_op's autograd kernel, which the shortcut falls back to


def _shortcut_autograd(name, op, fn):
    try:
        from torch._library.autograd import make_autograd_impl
        _slow[name] = make_autograd_impl(op._opoverload, op)    # reads op's backward when called
    except Exception:       # a torch without this internal keeps custom_op's kernel, unshortened
        return

    @torch.compiler.disable     # as around the direct CUDA kernel: no Dynamo on this frame's callees
    def autograd(keyset, *args):
        if goes_direct(keyset) and not (_C.is_grad_enabled() and _C._any_requires_grad(*args)):
            return fn(*args)
        return _slow[name](keyset, *args)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # "Overriding a previously registered kernel": custom_op's, on purpose
        try:
            _LIB.impl(name, autograd, "Autograd", with_keyset=True, **_OVERRIDE)
        except RuntimeError:    # a torch that refuses to replace a Python kernel: custom_op's stays
            _slow.pop(name)
