"""Which implementation runs a `torch.ops.moec.*` op: Triton kernels or the PyTorch references.

Default rule: CUDA tensors take the Triton kernels, CPU tensors the references in `reference.py`.
`set_backend("triton")` (or `with backend("triton"):`) forces the kernels on CPU tensors too, so CI
exercises them under TRITON_INTERPRET=1; `"reference"` forces the twins on CUDA (debug ladder).
float64 always takes the reference: it is the precision tests and identification prove in.
Nothing here reads the environment (STYLE.md principle 6); moec's Config may call set_backend.
"""
import contextlib

import torch

_CHOICES = ("auto", "triton", "reference")
_state = {"backend": "auto"}


def set_backend(name: str) -> None:
    """'auto' (CUDA -> Triton, CPU -> reference), 'triton' (always kernels) or 'reference'."""
    if name not in _CHOICES:
        from .errors import MoecKernelError
        raise MoecKernelError(f"moec kernels: backend {name!r} unknown; choose one of {_CHOICES}")
    _state["backend"] = name


def get_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def backend(name: str):
    """Run a block with another backend, restoring the previous one after."""
    before = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op whose main input is `t` runs the Triton kernels."""
    mode = _state["backend"]
    if mode == "reference" or t.dtype == torch.float64:
        return False
    return mode == "triton" or t.is_cuda
