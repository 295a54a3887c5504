"""Kernel tests: run the Triton path on CUDA, or on CPU under TRITON_INTERPRET=1 (CI).

Every op call in these tests goes through `kernels.backend("triton")`, so CPU tensors take the
kernels too. Inputs are fresh random values; padding around views holds NaN so that an
out-of-bounds read poisons the result.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from moec.codegen import fast_launch, kernels  # noqa: E402

from kernel_helpers import DEVICE  # noqa: E402
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def triton_backend():
    with kernels.backend("triton"):
        yield


if os.environ.get("MOEC_TEST_FAST_LAUNCH") == "1":   # the whole kernel suite through codegen/fast_launch.py
    fast_launch.set_enabled(True)

