"""moec/draw_schedule.py: a schedule picture is written; without matplotlib the error says what to install."""
import sys

import pytest

from moec.errors import MoecError
from moec.runtime import AllToAllModel, LayerCosts, Op, WGrad, search


def schedule():
    ops = lambda *names: [Op(n, 2e-4) for n in names]
    costs = LayerCosts(ops("out_proj", "norm", "router"), 1e8, Op("experts", 1e-3), 1e8, ops("residual", "qkv"))
    return search(costs, AllToAllModel(2e-5, 5e10, world_size=8), k_max=4,
                  wgrads=[WGrad("dw_qkv", 3e-4, after="qkv"), WGrad("dw_router", 1e-4, after="router")])


def test_picture(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the dump extra) is not installed")
    from moec.draw_schedule import draw_schedule
    s = schedule()
    assert s.k > 1
    draw_schedule(s, tmp_path / "s.png", title="test")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib(tmp_path, monkeypatch):
    from moec.draw_schedule import draw_schedule
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib now raises ImportError
    with pytest.raises(MoecError, match=r"pip install moec\[dump\]"):
        draw_schedule(schedule(), tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()
