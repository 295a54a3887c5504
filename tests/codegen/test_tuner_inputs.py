"""benchmarks/tune_kernels.py's kernel table (what users run to tune their layer): every kernel runs
at a small layer, each input made on first use, and a weight-gradient kernel alone never makes the
weights (a --jobs child then holds only its own tensors: 22 GB of weights at DeepSeek-V3 widths)."""
import importlib.util
import os

import pytest
import torch

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


def test_every_tuned_kernel_returns_what_it_wrote(tuner):
    # tuning compares those tensors across candidates (tuning.tune): a kernel returning none is unchecked
    s = tuner.Shape("tiny", 4, 2, 32, 16)
    fns = tuner.kernels_for(s, tuner.lazy_params(s, "cpu"), 9, device="cpu")
    for name in tuner.CANDIDATES:
        got = fns[name](SMALL)
        assert isinstance(got, list) and got and all(torch.is_tensor(t) for t in got), name


def test_tuning_refuses_a_faster_tile_with_other_values():
    from moec.codegen import tuning
    from moec.codegen.tuning import Tile
    base, wrong, right = Tile(16, 16, 16), Tile(32, 32, 32), Tile(64, 64, 64)
    x = torch.randn(8, 8)
    outputs = {base: x, wrong: x + 1.0, right: x + 1e-4 * x.abs().max()}
    speed = {base: 3.0, wrong: 1.0, right: 2.0}
    timed = []

    def bench(fn):
        fn()
        return speed[timed[-1]]

    def run(tile):
        timed.append(tile)
        return [outputs[tile].clone()]
    with pytest.warns(UserWarning, match="other values"):
        best, ms = tuning.tune("wgrad", (4, 2, 32, 16), torch.bfloat16, torch.device("cpu"), 9, run,
                               [base, wrong, right], bench=bench)
    assert best == right and ms == 2.0
    tuning._tuned.pop(tuning.key("wgrad", 4, 2, 32, 16, torch.bfloat16, torch.device("cpu"), 9))


def test_rotating_sets_launch_each_and_return_all_outputs(tuner):
    # decode timings cycle through input sets so the weights miss the L2; the value check must see every set
    s = tuner.Shape("tiny", 4, 2, 32, 16)
    sets = [tuner.kernels_for(s, tuner.lazy_params(s, "cpu"), 3, device="cpu") for _ in range(3)]
    run = tuner.rotating([fns["down"] for fns in sets])
    got = [t.clone() for t in run(SMALL)]
    assert len(got) == 3 and not torch.equal(got[0], got[1]) and not torch.equal(got[1], got[2])   # own inputs
    for t in run(SMALL):
        t.fill_(float("nan"))
    assert all(torch.isfinite(t).all() for t in run(SMALL))       # each set's launch rewrote its output
    assert tuner.rotating([sets[0]["down"]]) is sets[0]["down"]


def test_rotations_stream_four_l2s_a_cycle(tuner, monkeypatch):
    class Props:
        L2_cache_size = 50 << 20
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props)
    qwen3 = tuner.SHAPES["qwen3"]
    one_token = tuner.rotations(qwen3, 1, "cuda")             # 8 experts x 2048 x 768 x 2 B = 25 MB a projection
    assert one_token * 8 * 2048 * 768 * 2 >= 4 * (50 << 20) > (one_token - 1) * 8 * 2048 * 768 * 2
    assert tuner.rotations(qwen3, 4096, "cuda") == 1          # every expert, 400 MB a projection
    assert tuner.rotations(tuner.Shape("tiny", 4, 2, 32, 16), 1, "cuda") == 16     # capped


def test_tuning_reports_every_candidate():
    from moec.codegen import tuning
    from moec.codegen.tuning import Tile
    good, broken = Tile(16, 16, 16), Tile(32, 32, 32)
    seen = []

    def run(tile):
        if tile == broken:
            raise RuntimeError("out of shared memory")
        return [torch.randn(4)]
    tuning.tune("wgrad", (4, 2, 32, 16), torch.bfloat16, torch.device("cpu"), 9, run, [good, broken],
                bench=lambda fn: 1.5, report=lambda cand, ms: seen.append((cand, ms)))
    assert seen == [(good, 1.5), (broken, None)]
    tuning._tuned.pop(tuning.key("wgrad", 4, 2, 32, 16, torch.bfloat16, torch.device("cpu"), 9))
