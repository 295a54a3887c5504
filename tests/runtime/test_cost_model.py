"""runtime/cost_model.py: the all-to-all model against sums written out by hand (uneven routing:
the slowest rank decides), chunk times, least-squares calibration on synthetic timings (a fake
timer), the JSON cache, and a real gloo calibration on 2 ranks."""
import json
import math
import random

import pytest
import torch
import torch.distributed as dist

from moec.codegen.errors import MoecError
from moec.runtime import AllToAllModel, Calibration, ComputeModel, Op, calibrate, load_or_calibrate
from moec.runtime.cost_model import fit_latency_rate


def slowest_rank_s(m, bw_intra, bw_inter, per_host):
    """max over ranks of max(sent, received) per link kind / its bandwidth, with loops."""
    W, worst = len(m), 0.0
    for r in range(W):
        t = 0.0
        for same, bw in ((True, bw_intra), (False, bw_inter)):
            peers = [j for j in range(W) if j != r and (j // per_host == r // per_host) == same]
            sent, got = sum(m[r][j] for j in peers), sum(m[j][r] for j in peers)
            t = max(t, max(sent, got) / bw)
        worst = max(worst, t)
    return worst


def test_even_exchange():
    a2a = AllToAllModel(10e-6, 100e9, world_size=8)
    assert a2a.time(8e6) == pytest.approx(10e-6 + 7e6 / 100e9)
    assert a2a.time(8e6, chunks=4) == pytest.approx(10e-6 + 7e6 / 100e9 / 4)   # latency paid per chunk


@pytest.mark.parametrize("per_host", [2, 4])
def test_uneven_matrix_slowest_rank_decides(per_host):
    rng = random.Random(per_host)
    W = 8
    m = [[rng.uniform(0, 1e6) * (5 if j == 3 else 1) for j in range(W)] for _ in range(W)]   # rank 3 is hot
    flat = AllToAllModel(5e-6, 40e9, per_peer_latency_s=1e-6)
    want = max(max(sum(m[r][j] for j in range(W) if j != r), sum(m[j][r] for j in range(W) if j != r))
               for r in range(W)) / 40e9
    assert flat.time(m) == pytest.approx(5e-6 + 7e-6 + want, rel=1e-12)
    tiered = AllToAllModel(5e-6, 40e9, intra_bandwidth_Bps=400e9, inter_bandwidth_Bps=40e9, ranks_per_host=per_host)
    assert tiered.time(m, chunks=3) == pytest.approx(5e-6 + slowest_rank_s(m, 400e9, 40e9, per_host) / 3, rel=1e-12)
    assert tiered.time(m) < flat.time(m)


def test_per_peer_list_is_this_ranks_row():
    row = [3e5, 0.0, 7e5, 1e5]
    a2a = AllToAllModel(0.0, 1e9, intra_bandwidth_Bps=4e9, inter_bandwidth_Bps=1e9, ranks_per_host=2)
    # rank 1: peer 0 shares its host (3e5 at 4 GB/s), peers 2, 3 do not (8e5 at 1 GB/s)
    assert a2a.time(row, rank=1) == pytest.approx(max(3e5 / 4e9, 8e5 / 1e9))
    assert a2a.time(row, rank=2) == pytest.approx(max(1e5 / 4e9, 3e5 / 1e9))


def test_bad_bytes_and_models_are_refused():
    a2a = AllToAllModel(1e-6, 1e9)
    with pytest.raises(MoecError, match="world_size"):
        a2a.time(1e6)
    with pytest.raises(MoecError, match="finite and >= 0"):
        a2a.time([[0, -1], [1, 0]])
    with pytest.raises(MoecError, match="shape"):
        a2a.time([[0, 1, 2], [1, 0, 2]])
    with pytest.raises(MoecError, match="chunk count"):
        a2a.time([1, 2], chunks=0)
    with pytest.raises(MoecError, match="bandwidth_Bps"):
        AllToAllModel(1e-6, 0.0)
    with pytest.raises(MoecError, match="fixed_s"):
        Op("x", 1.0, fixed_s=2.0)


def test_compute_roofline_and_chunks():
    cm = ComputeModel(100e12, 2e12, 5e-6)
    assert cm.time(flops=1e12) == pytest.approx(5e-6 + 0.01)
    assert cm.time(bytes=1e9) == pytest.approx(5e-6 + 5e-4)
    assert cm.time(1e12, 1e9, measured_s=0.5) == 0.5
    # a GEMM whose weights (4 GB) every chunk reads again: compute-bound whole, memory-bound in 8 chunks
    op = cm.op("gemm", flops=1e12, bytes=5e9, fixed_bytes=4e9, k_max=8)
    assert op.time_s == pytest.approx(5e-6 + 0.01)                          # 10 ms of flops > 2.5 ms of bytes
    assert op.chunk_s(8) == pytest.approx(5e-6 + (4e9 + 1e9 / 8) / 2e12)   # 1.25 ms of flops < 2.06 ms of bytes
    assert all(op.chunk_s(k) * k >= op.time_s for k in range(1, 12))
    assert cm.op("gemm", 1e12, 5e9, 4e9, measured_s=0.02).chunk_s(2) == pytest.approx(2 * op.chunk_s(2), rel=1e-3)
    lin = Op("norm", 1.0, fixed_s=0.2)
    assert lin.chunk_s(4) == pytest.approx(0.2 + 0.8 / 4)
    assert Op("odd", 1.0, chunk_times=(1.0, 0.3)).chunk_s(2) == 0.5   # never cheaper than time / k


def test_fit_recovers_latency_and_rate():
    rng = random.Random(0)
    xs = [1e4, 1e5, 1e6, 1e7]
    ts = [20e-6 + x / 3e9 * (1 + rng.uniform(-0.01, 0.01)) for x in xs]
    lat, per = fit_latency_rate(xs, ts, "test")
    assert lat == pytest.approx(20e-6, rel=0.2) and 1 / per == pytest.approx(3e9, rel=0.02)
    assert fit_latency_rate([1, 2], [0.5, 1.5], "test") == (0.0, pytest.approx(0.7))   # negative intercept refit
    with pytest.raises(MoecError, match="did not grow"):
        fit_latency_rate([1, 2, 3], [3.0, 2.0, 1.0], "test")


class FakeTimer:
    """Times from a known machine, without running anything."""
    peak, bw, launch = 2e11, 2e10, 3e-6

    def __init__(self):
        self.calls = 0

    def __call__(self, what, amount, fn):
        self.calls += 1
        rate = {"matmul": self.peak, "copy": self.bw, "launch": 1.0, "all_to_all": 1e9}[what]
        return self.launch + amount / rate


def test_calibration_fits_a_fake_timer():
    cal = calibrate("cpu", timer=FakeTimer())
    assert cal.compute.flops_per_s == pytest.approx(FakeTimer.peak, rel=1e-9)
    assert cal.compute.bytes_per_s == pytest.approx(FakeTimer.bw, rel=1e-9)
    assert cal.compute.launch_s == pytest.approx(FakeTimer.launch)
    assert cal.all_to_all is None and cal.key == "cpu-ws1-none"


def test_cache_round_trip(tmp_path):
    timer = FakeTimer()
    first = load_or_calibrate("cpu", cache_dir=str(tmp_path), timer=timer)
    measured = timer.calls
    assert measured > 0
    path = tmp_path / "calibration" / "cpu-ws1-none.json"
    assert json.loads(path.read_text())["compute"]["flops_per_s"] == pytest.approx(FakeTimer.peak)
    again = load_or_calibrate("cpu", cache_dir=str(tmp_path), timer=timer)
    assert timer.calls == measured and again == first            # read back, nothing measured
    load_or_calibrate("cpu", cache_dir=str(tmp_path), timer=timer, refresh=True)
    assert timer.calls == 2 * measured
    path.write_text("{not json")
    with pytest.raises(MoecError, match="delete the file"):
        Calibration.load(path)
    load_or_calibrate("cpu", cache_dir=str(tmp_path), timer=timer)   # unreadable: measured again, rewritten
    assert timer.calls == 3 * measured and Calibration.load(path).compute == first.compute
    a2a = AllToAllModel(1e-5, 2e9, world_size=4)
    with_a2a = Calibration("k", first.compute, a2a, "now")
    assert Calibration.from_json(with_a2a.to_json()) == with_a2a


def calibrate_over_gloo(rank, ws, cache_dir):
    cal = load_or_calibrate("cpu", group=dist.group.WORLD, cache_dir=cache_dir)
    again = load_or_calibrate("cpu", group=dist.group.WORLD, cache_dir=cache_dir)   # cached: no collectives
    assert again == cal
    return cal


def test_gloo_all_to_all_calibration(pool2, tmp_path):
    cals = pool2.run(calibrate_over_gloo, str(tmp_path), timeout=120)
    assert cals[0] == cals[1]                                    # every rank gets rank 0's numbers
    cal = cals[0]
    assert cal.key == "cpu-ws2-gloo" and (tmp_path / "calibration" / "cpu-ws2-gloo.json").exists()
    a2a = cal.all_to_all
    for v in (cal.compute.flops_per_s, cal.compute.bytes_per_s, a2a.bandwidth_Bps):
        assert 0 < v < math.inf
    assert 0 <= a2a.latency_s < 1.0 and 0 < cal.compute.launch_s < 1.0 and a2a.world_size == 2
    assert torch.isfinite(torch.tensor([a2a.time(1e6), a2a.latency_s])).all()
