"""Weight tiles through TMA descriptors (`Tile.tma`, jit_helpers.weight_desc / weight_tile): the
gate/up, down (forward and input gradient) and dh kernels against float64 references, forward and
every gradient, on NaN-padded views whose rows are 16-byte aligned (so TMA can read them) in both
orientations (a view's K or its N of unit stride); and the views TMA cannot read fall back to
pointer loads."""
import collections

import pytest
import torch

from moec.codegen import dh_kernel, down_kernel, gate_up_kernel, jit_helpers, tuning
from moec.codegen.tuning import Tile

from kernel_helpers import DEVICE, padded
import test_experts_combine
import test_experts_launch

TMA = Tile(16, 16, 16, 4, 1, tma=True)


@pytest.fixture
def used(monkeypatch):
    """Counter of (kernel module, descriptor made, K_LAST) over the launches a test makes."""
    seen = collections.Counter()
    real = jit_helpers.weight_desc
    for mod in (gate_up_kernel, down_kernel, dh_kernel):
        def spy(w, tile, transpose=False, mod=mod):
            desc, k_last = real(w, tile, transpose)
            seen[(mod.__name__.rsplit(".", 1)[1], desc is not None, k_last)] += 1
            return desc, k_last
        monkeypatch.setattr(mod, "weight_desc", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["interleaved", "transposed"])
def test_experts_through_tma(used, layout, dtype):
    test_experts_launch._run(11, 4, 2, 40, 24, dtype, "swiglu_oai", True, True, layout=layout, tile=TMA, pad=8)
    test_experts_combine._run(13, 4, 2, 48, 40, dtype, "silu", bias=True, layout=layout, tile=TMA, pad=8)
    test_experts_combine._run(17, 5, 2, 24, 40, dtype, "gelu", gated=False, layout=layout, how="sparse", tile=TMA,
                              pad=8)
    for kernel in ("gate_up_kernel", "down_kernel", "dh_kernel"):
        assert sum(n for (mod, made, _), n in used.items() if mod == kernel and made), (kernel, used)
    # both orientations of a weight view occur in every layout (W_down's transpose in the forward)
    assert {k_last for (_, made, k_last) in used if made} == {False, True}, used


def test_unreadable_views_fall_back_to_pointers():
    w = padded((3, 40, 24), torch.float32, pad=3)               # rows of 27 floats: not 16-byte aligned
    assert jit_helpers.weight_desc(w, TMA) == (None, False)
    w = torch.randn(3, 40, 48, device=DEVICE)[:, ::2, ::2]     # neither K nor N of unit stride
    assert jit_helpers.weight_desc(w, TMA) == (None, False)
    w = torch.randn(3, 40, 48, device=DEVICE)
    assert jit_helpers.weight_desc(w, Tile(16, 16, 16)) == (None, False)     # the tile does not ask for it
    desc, k_last = jit_helpers.weight_desc(w, TMA)
    assert desc is not None and not k_last and list(desc.block_shape) == [1, 16, 16]
    desc, k_last = jit_helpers.weight_desc(w.transpose(1, 2), TMA)
    assert desc is not None and k_last and list(desc.shape) == [3, 40, 48]


def test_tma_setting_survives_a_saved_table(tmp_path):
    key = tuning.key("down", 4, 2, 40, 24, torch.bfloat16, torch.device("cpu"), 16)
    saved = dict(tuning._tuned)
    try:
        tuning._tuned[key] = TMA
        tuning.save(tmp_path / "t.json", keys={key})
        tuning._tuned.clear()
        tuning.load(tmp_path / "t.json")
        assert tuning._tuned[key] == TMA and tuning._tuned[key].tma
    finally:
        tuning._tuned.clear()
        tuning._tuned.update(saved)
