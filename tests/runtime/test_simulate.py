"""runtime/simulate.py: the CLI runs, its three schedules nest (full <= experts-only <= serial, as
their search spaces do), and its all-to-all sizes follow from the layer."""
import json
import subprocess
import sys

import pytest

from moec.runtime import simulate
from moec.runtime.cost_model import ComputeModel


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "moec.runtime.simulate", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--nvlink-GBps" in out.stdout and "--imbalance" in out.stdout


def test_table_and_json(tmp_path, capsys):
    path = tmp_path / "sim.json"
    assert simulate.main(["--worlds", "8,64,1024", "--imbalance", "1.5", "--explain", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "full ms" in text and "tutel ms" in text and text.count("k=") >= 3
    rows = json.loads(path.read_text())["rows"]
    assert [r["world"] for r in rows] == [8, 64, 1024] and rows[2]["ep"] == 64     # 64 experts: ep <= 64
    for r in rows:
        assert r["full"]["step_s"] <= r["tutel"]["step_s"] * (1 + 1e-12) <= r["serial"]["step_s"] * (1 + 1e-12)
        assert r["serial"]["k"] == 1 and r["tutel"]["chunked_ops"] == []


def test_bytes_follow_the_layer():
    s = simulate.Setup(tokens=1024, hidden=512, top_k=2, experts=16, gpus_per_host=4, latency_us=0, per_peer_us=0,
                       nvlink_GBps=400, ib_GBps=40)
    costs, a2a, ep, e = simulate.layer(s, 16, ComputeModel(1e14, 1e12))
    assert (ep, e) == (16, 1)
    sent = 1024 * 2 * 512 * 2                                    # T*k*H*d bytes, 1/16 to each rank
    assert a2a.time(costs.dispatch_bytes) == pytest.approx(max(sent * 3 / 16 / 400e9, sent * 12 / 16 / 40e9))
    assert simulate.main(["--worlds", "12"]) == 2                 # 64 experts do not spread over 12 ranks
