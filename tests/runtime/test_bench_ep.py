"""benchmarks/bench_ep.py, the 2-GPU measurement of issues 4 and 5, smoke-run on 2 gloo ranks with a
tiny model, so that it still runs when the GPUs come: every variant fills its row, and the
expert-parallel model's logits and dense gradients equal the one-process model's."""
import json
import os
import subprocess
import sys
from pathlib import Path

from fixed_calibration import write_calibration

from moec.runtime.cost_model import AllToAllModel

ROOT = Path(__file__).parents[2]


def test_bench_ep_runs_on_gloo(tmp_path):
    write_calibration(tmp_path / "cache", 2, AllToAllModel(1e-6, 3e7, world_size=2))   # not measured here
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MOEC_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "benchmarks" / "bench_ep.py"), "--cpu", "--tiny", "--shapes", "mixtral", "--tokens", "16",
           "--variants", "single,ep,ep_lancet_tokens,ep_lancet", "--dense-backend", "aot_eager", "--steps", "1", "--warmup", "0",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_ep.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["single", "ep", "ep_lancet_tokens", "ep_lancet"], rows
    assert all("error" not in r and r["step_ms"] > 0 for r in rows), rows
    for r in rows[1:]:
        assert r["rel_err_logits"] < 1e-5 and r["rel_err_embedding_grad"] < 1e-5, r
    assert rows[2]["predicted_layers_ms"] is not None and rows[3]["predicted_layers_ms"] is not None, rows[2:]
    assert (tmp_path / "bench_ep.md").exists()
