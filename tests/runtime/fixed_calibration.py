"""A cached calibration with fixed rates, for tests whose subject is not the measurement: with one in
cache_dir, no compile measures (a loaded CI host cannot change the schedule it picks)."""
from pathlib import Path

from moec.runtime.cost_model import Calibration, ComputeModel


def write_calibration(cache_dir, ws, a2a, compute=ComputeModel(1e9, 1e10, 1e-6)):
    key = f"cpu-ws{ws}-gloo"            # calibration_key of a CPU device and a gloo group of ws ranks
    path = Path(cache_dir) / "calibration" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(Calibration(key, compute, a2a).to_json())
