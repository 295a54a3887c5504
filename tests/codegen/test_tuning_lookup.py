"""Where launch settings come from: the GPU's own shipped table first, then a table shipped for
another GPU of its architecture, then the heuristic table. No GPU needed: the device's name and
architecture are stand-ins."""
import json

import pytest
import torch

from moec.codegen import tuning
from moec.codegen.tuning import Tile

from kernel_helpers import DEVICE

LAYER = (64, 8, 2048, 1024, torch.bfloat16)


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A shipped table tuned on "GPU A" (sm90) and a fresh lookup state."""
    tuned = Tile(64, 128, 32, 8, 3)
    key = tuning.key("gate_up", *LAYER, torch.device("cpu"), 4096, gpu="GPU A")
    (tmp_path / "tuned_a_sm90.json").write_text(json.dumps({key: vars(tuned)}))
    monkeypatch.setattr(tuning, "_SHIPPED", str(tmp_path))
    monkeypatch.setattr(tuning, "_shipped_loaded", False)
    monkeypatch.setattr(tuning, "_tuned", {})
    monkeypatch.setattr(tuning, "_by_arch", {})
    return tuned


def _tile_on(monkeypatch, name, arch, tokens=4096):
    monkeypatch.setattr(tuning, "_device_name", lambda device: name)
    monkeypatch.setattr(tuning, "_arch", lambda device: arch)
    return tuning.tile("gate_up", *LAYER, torch.device("cuda"), tokens)


def test_the_gpu_it_was_tuned_on_reads_it(shipped, monkeypatch):
    assert _tile_on(monkeypatch, "GPU A", "sm90") == shipped


def test_another_gpu_of_the_architecture_reads_it(shipped, monkeypatch):
    assert _tile_on(monkeypatch, "GPU B", "sm90") == shipped


def test_other_architectures_and_far_buckets_fall_to_the_heuristic(shipped, monkeypatch):
    heuristic = tuning._default("gate_up", 4096 * 8 / 64, torch.bfloat16)
    assert _tile_on(monkeypatch, "GPU C", "sm100") == heuristic != shipped
    assert _tile_on(monkeypatch, "GPU B", "sm90", tokens=64) == tuning._default("gate_up", 64 * 8 / 64, torch.bfloat16)
    # more than a factor of 4 away: 65536 tokens is the 65536 bucket, four doublings from 4096
    assert _tile_on(monkeypatch, "GPU A", "sm90", tokens=40000) == heuristic


@pytest.mark.parametrize("gpu", ["GPU A", "GPU B"])
def test_an_untuned_bucket_reads_the_nearest_tuned_one(shipped, monkeypatch, gpu):
    """8192 tokens run 4096's tiles, on the GPU tuned and on another of its architecture; a token
    count whose rows per expert fall on the other side of the decode line does not (64 tokens: 8
    rows per expert against 4096's 512)."""
    for tokens in (8192, 5000, 16384, 2048, 1025):
        assert _tile_on(monkeypatch, gpu, "sm90", tokens=tokens) == shipped, tokens
    small = Tile(16, 32, 128, 4, 3)
    tuning._tuned[tuning.key("gate_up", *LAYER, torch.device("cpu"), 16, gpu="GPU A")] = small
    tuning._tuned[tuning.key("gate_up", *LAYER, torch.device("cpu"), 64, gpu="GPU A")] = Tile(32, 64, 64)
    tuning._tuned[tuning.key("gate_up", *LAYER, torch.device("cpu"), 256, gpu="GPU A")] = Tile(64, 64, 64)
    monkeypatch.setattr(tuning, "_device_name", lambda device: "GPU A")
    at = lambda tokens: tuning.tile("gate_up", *LAYER, torch.device("cuda"), tokens)
    assert at(32) == small                  # 16 and 64 one doubling away each: the smaller
    # 512 tokens, 64 rows per expert: past the decode line, so not 256's (32 rows), and 4096 is 8x away
    assert at(512) == tuning._default("gate_up", 512 * 8 / 64, torch.bfloat16)
    assert at(1024) == shipped
    assert tuning.tile("dh", *LAYER, torch.device("cuda"), 8192) == tuning._default("dh", 8192 * 8 / 64,
                                                                                    torch.bfloat16)


def test_a_cached_nearest_key_gone_from_its_table_is_not_served(shipped, monkeypatch):
    """The nearest-bucket cache is keyed by the table's identity and size: a table that lost the
    cached key and gained another (same id, same size) falls through to the next table."""
    assert _tile_on(monkeypatch, "GPU A", "sm90", tokens=8192) == shipped      # caches GPU A's 4096 key
    key = tuning.key("gate_up", *LAYER, torch.device("cpu"), 4096, gpu="GPU A")
    other = tuning.key("gate_up", 32, 8, 2048, 1024, torch.bfloat16, torch.device("cpu"), 4096, gpu="GPU A")
    tuning._tuned[other] = tuning._tuned.pop(key)
    assert _tile_on(monkeypatch, "GPU A", "sm90", tokens=8192) == shipped      # now from the architecture's


def test_a_table_tuned_here_wins(shipped, monkeypatch):
    own = Tile(128, 128, 64, 8, 4)
    monkeypatch.setattr(tuning, "_device_name", lambda device: "GPU B")
    tuning._tuned[tuning.key("gate_up", *LAYER, torch.device("cuda"), 4096)] = own
    assert _tile_on(monkeypatch, "GPU B", "sm90") == own


def test_user_tables_in_the_cache_win_and_are_read_once(shipped, tmp_path, monkeypatch):
    mine = Tile(16, 64, 128, 4, 3)
    folder = tmp_path / "tuning"
    folder.mkdir()
    monkeypatch.setattr(tuning, "_dirs_loaded", set())
    key = tuning.key("gate_up", *LAYER, torch.device("cpu"), 4096, gpu="GPU A")
    (folder / "tuned_gpu_a.json").write_text(json.dumps({key: vars(mine)}))
    tuning.load_dir(str(folder))
    assert _tile_on(monkeypatch, "GPU A", "sm90") == mine != shipped
    (folder / "tuned_gpu_a.json").write_text(json.dumps({key: vars(shipped)}))
    tuning.load_dir(str(folder))            # once per process: compiles do not re-read it
    assert _tile_on(monkeypatch, "GPU A", "sm90") == mine


def test_compiling_reads_the_cache_dir(tmp_path, monkeypatch):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from moe_idioms import MaskLoopMoE
    seen = []
    monkeypatch.setattr(tuning, "load_dir", seen.append)
    torch._dynamo.reset()
    module = MaskLoopMoE().to(DEVICE)       # the Triton path on this suite's device (CPU tensors: interpreter only)
    torch.compile(module, backend="moec", options={"dense_backend": "eager", "cache_dir": str(tmp_path)})(
        torch.randn(6, 32, device=DEVICE))
    assert seen and all(s == str(tmp_path / "tuning") for s in seen), seen


def test_before_hopper_the_heuristic_takes_tiles_that_do_not_spill():
    train, decode = 4096 * 8 / 64, 1 * 8 / 64
    for kernel in ("dh", "down_dx"):
        hopper = tuning._default(kernel, train, torch.bfloat16, "sm90")
        ampere = tuning._default(kernel, train, torch.bfloat16, "sm80")
        assert ampere == tuning._PRE_HOPPER[kernel] != hopper
        assert tuning._default(kernel, train, torch.bfloat16, "sm100") == hopper
        # decode tiles and other kernels are the same on every architecture
        assert tuning._default(kernel, decode, torch.bfloat16, "sm80") == tuning._default(kernel, decode,
                                                                                         torch.bfloat16)
    assert tuning._default("gate_up", train, torch.bfloat16, "sm80") == tuning._default("gate_up", train,
                                                                                        torch.bfloat16)


def test_origin_names_where_a_tile_comes_from(shipped, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "_loaded_from", {})
    monkeypatch.setattr(tuning, "_shipped_keys", set())
    monkeypatch.setattr(tuning, "_device_name", lambda device: "GPU A")
    monkeypatch.setattr(tuning, "_arch", lambda device: "sm90")
    where = lambda tokens=4096: tuning.origin("gate_up", *LAYER, torch.device("cuda"), tokens)
    assert where() == "shipped" and where(64) == "heuristic"
    assert where(8192) == "shipped (the T4096 bucket's)"
    monkeypatch.setattr(tuning, "_device_name", lambda device: "GPU B")
    assert where() == "shipped for sm90"
    assert where(2048) == "shipped for sm90 (the T4096 bucket's)"
    mine = tmp_path / "mine.json"
    key = tuning.key("gate_up", *LAYER, torch.device("cpu"), 4096, gpu="GPU B")
    mine.write_text(json.dumps({key: vars(Tile(16, 64, 128, 4, 3))}))
    tuning.load(str(mine))
    assert where() == str(mine)
    with tuning.pin(gate_up=Tile(32, 32, 32)):
        assert where() == "pinned"
