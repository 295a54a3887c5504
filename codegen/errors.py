"""moec's error family lives in the lowest layer so kernels and passes raise the same classes."""


class MoecError(RuntimeError):
    """Something moec cannot do; the message says what, where, and what to do instead."""


class MoecKernelError(MoecError, ValueError):
    """A moec op was called with inputs it does not support (dtype, device, shape)."""
