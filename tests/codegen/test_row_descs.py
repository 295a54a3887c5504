"""Grouped rows through descriptors made per expert on the device (Tile.row_descs). The down kernel
(forward down projection, input gradient), the whole layer forward and backward against float64
with every GEMM so: rows past a segment's end must read as zeros. The weight-gradient kernel
(codegen/wgrad_rowdesc_kernel.py) against float64
references: experts of every length (empty, the first one empty at row 0, one row, partial blocks,
whole blocks, blocks and a tail: each expert's descriptors are clipped at its last row, so the
next expert's rows must read as zeros), dual, gathered rows of either operand, outputs written
transposed into strided views, bias gradients beside it (weighted rows too); chunked copies and
operands a descriptor cannot read staying on the per-tile kernel."""
import pytest
import torch

from moec.codegen import down_kernel, wgrad_kernel
from moec.codegen.tuning import Tile

from kernel_helpers import DEVICE, TOL, rel_err
import test_experts_combine
import test_experts_launch
from test_tma_weights import _wgrad_reference, kept_tuned, saved_and_loaded
from test_wgrad_persistent import COUNTS, _biases, _chunked, _dual_and_gathered, _launched, _setup

# small programs keep the interpreter quick; on a GPU a tile of the size shipped (wgmma)
TILE = Tile(16, 16, 16, 4, 2, row_descs=True) if DEVICE == "cpu" else Tile(128, 64, 32, 4, 3, row_descs=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowdesc_dual_gathered_and_transposed(monkeypatch, dtype):
    seen = _launched(monkeypatch)
    E, M, N = _dual_and_gathered(dtype, TILE)
    assert [name for name, _ in seen] == ["wgrad_rowdesc_kernel"] * 2
    assert seen[0][1] == (E * -(-M // TILE.block_m) * -(-N // TILE.block_n),)     # one program a tile


def test_rowdesc_one_expert_all_rows_and_no_rows(monkeypatch):
    seen = _launched(monkeypatch)
    M = N = 16
    for counts in ([0, 0, 70], [0, 0, 0], [16, 0, 32]):
        S, offsets, _, new = _setup(torch.float32, M, N, counts=counts)
        a, b = new(max(S, 1), M), new(max(S, 1), N)
        out = torch.full((3, M, N), float("nan"), device=DEVICE)
        wgrad_kernel.launch_wgrad(a, b, offsets, out, TILE)
        if S:
            assert rel_err(out.cpu(), _wgrad_reference(a, b, counts)[0].cpu()) < TOL[torch.float32]
        else:
            assert torch.equal(out.cpu(), torch.zeros(3, M, N))
    assert [name for name, _ in seen] == ["wgrad_rowdesc_kernel"] * 3


def test_rowdesc_biases_beside_and_fallbacks(monkeypatch):
    seen = _launched(monkeypatch)
    _biases(TILE)
    assert [name for name, _ in seen] == ["wgrad_rowdesc_kernel", "bias_grad_kernel", "bias_grad_kernel",
                                          "wgrad_rowdesc_kernel", "bias_grad_kernel"]
    del seen[:]
    # rows 100 bytes apart: no descriptor can read them, so the per-tile kernel (pointers) runs
    dtype, k, M, N = torch.float32, 2, 24, 40
    S, offsets, src, new = _setup(dtype, M, N, k)
    x, odd = new(S // k + 1, N), new(S, M + 1)[:, :M]
    out = torch.empty(len(COUNTS), M, N, device=DEVICE)
    wgrad_kernel.launch_wgrad(odd, x, offsets, out, TILE, src=src, k=k)
    assert rel_err(out.cpu(), _wgrad_reference(odd, x[src // k], COUNTS)[0].cpu()) < TOL[dtype]
    # chunked copies (rows offset into a chunk) keep the per-tile kernel too
    _chunked(monkeypatch, TILE)
    assert {name for name, _ in seen} == {"wgrad_kernel"} and len(seen) > 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tma", [False, True])
def test_layer_with_row_descriptors(monkeypatch, dtype, tma):
    flags = []
    real = down_kernel.launch

    def spy(kernel, grid, *args, **kw):
        if kernel is down_kernel.down_kernel:
            flags.append(kw.get("ROW_DESC", False))
        return real(kernel, grid, *args, **kw)
    monkeypatch.setattr(down_kernel, "launch", spy)
    tile = Tile(16, 16, 16, 4, 1, tma=tma, row_descs=True)
    test_experts_launch._run(11, 4, 2, 40, 24, dtype, "swiglu_oai", True, True, layout="transposed", tile=tile)
    test_experts_combine._run(13, 4, 2, 48, 40, dtype, "silu", bias=True, layout="interleaved", tile=tile)
    # forward down projections and input gradients, all through row descriptors
    assert len(flags) >= 4 and all(flags), flags
    del flags[:]
    odd = Tile(16, 16, 16, 4, 1, row_descs=True)     # rows of 25 floats: no descriptor, pointers instead
    test_experts_combine._run(13, 4, 2, 48, 25, torch.float32, "silu", layout="interleaved", tile=odd)
    assert flags and not any(flags), flags


def test_row_descs_survive_a_saved_table_and_unknown_settings_are_ignored(tmp_path):
    import json
    from moec.codegen import tuning
    key = tuning.key("wgrad", 4, 2, 40, 24, torch.bfloat16, torch.device("cpu"), 16)
    with kept_tuned():
        loaded = saved_and_loaded(tmp_path / "t.json", key, TILE)
        assert loaded == TILE and loaded.row_descs
        # a table from another moec version: a setting this one lacks is dropped, the rest kept
        table = json.loads((tmp_path / "t.json").read_text())
        table[key]["warp_spec"] = True
        (tmp_path / "u.json").write_text(json.dumps(table))
        tuning._tuned.clear()
        with pytest.warns(UserWarning, match="warp_spec"):
            tuning.load(tmp_path / "u.json")
        assert tuning._tuned[key] == TILE


def test_scratch_allocator_set_per_thread_and_never_over_the_users():
    import threading
    import triton
    from triton.runtime import _allocation
    from moec.codegen import jit_helpers
    seen = {}

    def fresh_thread():     # autograd runs a CUDA backward on threads of its own: each starts with none
        seen["before"] = type(_allocation._allocator.get())
        jit_helpers.ensure_allocator()
        seen["after"] = _allocation._allocator.get()

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert seen["before"] is _allocation.NullAllocator and seen["after"] is jit_helpers._torch_scratch

    def users_own(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def with_users_own():
        triton.set_allocator(users_own)
        jit_helpers.ensure_allocator()
        seen["kept"] = _allocation._allocator.get()

    thread = threading.Thread(target=with_users_own)
    thread.start()
    thread.join()
    assert seen["kept"] is users_own
