"""Test set-up: every test starts from a fresh Dynamo cache and counters; the session compiles
into its own Inductor cache, so artifacts a previous checkout of moec left in the shared default
cache (made with other op schemas) are never replayed."""
import os
import tempfile

import pytest
import torch
from torch._dynamo.utils import counters

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="moec-tests-inductor-"))


def _interpreter_rounds_bf16_to_nearest():
    """Triton's CPU interpreter casts float32 to bfloat16 by dropping the low 16 bits (its
    `_convert_float` without a rounding mode); a GPU rounds to nearest even. Truncation pulls every
    bf16 value a kernel stores towards zero by half an ulp on average, a bias float64 references
    see as ~0.7% on products of two such values (the routing weights' gradient through saved
    bf16 pre-activations, 2026-12-07), so tests would judge the interpreter's rounding, not moec's
    kernels. Cast as the GPU does."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return truncating(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        nan = np.isnan(src.data)
        rounded = (bits + np.where(nan, 0, 0x7FFF + ((bits >> 16) & 1)).astype(np.uint32)) >> 16
        rounded = np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)     # NaN stays NaN
        return interpreter.TensorHandle(rounded, tl.bfloat16)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


_interpreter_rounds_bf16_to_nearest()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
