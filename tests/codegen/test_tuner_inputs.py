"""benchmarks/tune_kernels.py's kernel table (what users run to tune their layer): every kernel runs
at a small layer, each input made on first use, and a weight-gradient kernel alone never makes the
weights (a --jobs child then holds only its own tensors: 22 GB of weights at DeepSeek-V3 widths)."""
import importlib.util
import os

import pytest

from test_experts_launch import SMALL

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "tune_kernels.py")


@pytest.fixture(scope="module")
def tuner():
    spec = importlib.util.spec_from_file_location("tune_kernels", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_kernel_runs_and_weights_only_where_read(tuner):
    s = tuner.Shape("tiny", 4, 2, 32, 16)
    made = []

    def params():
        made.append(1)
        return tuner.lazy_params(s, "cpu")()
    fns = tuner.kernels_for(s, params, 9, device="cpu")
    assert set(tuner.CANDIDATES) <= set(fns)
    for name in ("wgrad", "wgrad_dual", "route", "plan", "combine"):
        fns[name](SMALL)
    assert not made
    for name in ("gate_up", "down", "gate_up_bwd", "dh", "down_dx"):
        fns[name](SMALL)
    assert made
