"""How moec's ops are registered: `torch.library.custom_op` (schema from the annotations, fake and
autograd registrations, trace-time checks), plus the same function as the op's CUDA kernel,
registered with the dispatcher directly.

Why: custom_op's own backend kernel is a Python wrapper around the function (pytree handling, an
aliasing check of the outputs against the inputs, Dynamo disabled around it) that cost 20-25 us
per call on top of the function on this repository's CPU machine, paid by every op of every
layer on every step without CUDA graphs. On CUDA tensors the dispatcher now calls the function,
with Dynamo disabled around it as custom_op does (~0.5 us: an op called from eager code while a
compiled function runs must not have its Python traced); CPU tensors (CI, the reference path)
keep custom_op's wrapper and its aliasing check, which every op's tests pass through.
"""
import torch

_LIB = torch.library.Library("moec", "IMPL")


def moec_op(name):
    """@moec_op("route") def route(...): torch.ops.moec.route, with no mutated arguments."""
    def register(fn):
        op = torch.library.custom_op(f"moec::{name}", mutates_args=())(fn)
        _LIB.impl(name, torch.compiler.disable(fn), "CUDA")
        return op
    return register
