"""Weight tiles through TMA descriptors (`Tile.tma`, jit_helpers.weight_desc / weight_tile): the
gate/up, down (forward and input gradient) and dh kernels against float64 references, forward and
every gradient, on NaN-padded views whose rows are 16-byte aligned (so TMA can read them) in both
orientations (a view's K or its N of unit stride); and the views TMA cannot read fall back to
pointer loads. The weight-gradient kernel's operand row blocks through TMA (wgrad_kernel._descs):
segments of every length around the block (a partial last block must not read the next expert's
rows), dual, biases, gathered rows, chunked copies."""
import collections
import contextlib

import pytest
import torch

from moec.codegen import dh_kernel, down_kernel, gate_up_kernel, jit_helpers, tuning, wgrad_kernel
from moec.codegen.tuning import Tile

from kernel_helpers import DEVICE, TOL, padded, rel_err
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


def saved_and_loaded(path, key, tile):
    """`tile` under `key` through a table saved to `path` and loaded into a cleared lookup: what a
    later process reads (the caller restores tuning._tuned: `kept_tuned`)."""
    tuning._tuned[key] = tile
    tuning.save(path, keys={key})
    tuning._tuned.clear()
    tuning.load(path)
    return tuning._tuned[key]


@contextlib.contextmanager
def kept_tuned():
    saved = dict(tuning._tuned)
    try:
        yield
    finally:
        tuning._tuned.clear()
        tuning._tuned.update(saved)


def test_tma_setting_survives_a_saved_table(tmp_path):
    key = tuning.key("down", 4, 2, 40, 24, torch.bfloat16, torch.device("cpu"), 16)
    with kept_tuned():
        loaded = saved_and_loaded(tmp_path / "t.json", key, TMA)
        assert loaded == TMA and loaded.tma


def _wgrad_reference(a, b, counts, w=None):
    """float64 (E, M, N) per-segment a^T b and (E, M) row sums of a (weighted by w per row)."""
    out, db, r = [], [], 0
    for n in counts:
        a_e, b_e = a[r:r + n].double(), b[r:r + n].double()
        out.append(a_e.t() @ b_e)
        db.append((a_e * (w[r:r + n, None].double() if w is not None else 1)).sum(0))
        r += n
    return torch.stack(out), torch.stack(db)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("copy_rows", [None, 24])
def test_weight_gradients_through_tma(monkeypatch, dtype, copy_rows):
    made = []
    real = wgrad_kernel._descs
    monkeypatch.setattr(wgrad_kernel, "_descs", lambda *a: made.append(real(*a)) or made[-1])
    k, M, N, tile = 2, 24, 40, Tile(16, 16, 16, 4, 2, tma=True)
    counts = [0, 5, 16, 33, 1, 47, 32]     # empty, partial, one block, blocks + tail, ...
    S = sum(counts)
    if copy_rows:     # chunks of 24 rows: experts straddle chunks, blocks straddle chunk ends
        monkeypatch.setattr(wgrad_kernel, "MAX_COPY_BYTES", copy_rows * max(M, N) * dtype.itemsize)
    offsets = torch.tensor([0] + counts, device=DEVICE).cumsum(0)
    src = torch.randperm(S, device=DEVICE)
    new = lambda *shape: torch.randn(*shape, device=DEVICE).to(dtype)      # noqa: E731
    x, du, dg = new(S // k + 1, N), new(S, M), new(S, M)
    out, out2 = [torch.full((len(counts), M, N), float("nan"), device=DEVICE, dtype=dtype) for _ in range(2)]
    db, db2 = [torch.full((len(counts), M), float("nan"), device=DEVICE, dtype=dtype) for _ in range(2)]
    # dW_up | dW_gate: du and dg against x's rows gathered by token, biases from du and dg
    wgrad_kernel.launch_wgrad(du, x, offsets, out, tile, src=src, k=k, a2=dg, out2=out2, db=db, db2=db2)
    rows = x[src // k]
    for got, got_b, a in ((out, db, du), (out2, db2, dg)):
        want, want_b = _wgrad_reference(a, rows, counts)
        assert rel_err(got.cpu(), want.cpu()) < TOL[dtype] and rel_err(got_b.cpu(), want_b.cpu()) < TOL[dtype]
    # dW_down: grad_out's rows gathered by token against h, bias from the w-weighted rows
    go, h = new(S // k + 1, M), new(S, N)
    w = torch.rand(S // k + 1, k, device=DEVICE).to(dtype)
    wgrad_kernel.launch_wgrad(go, h, offsets, out, tile, k=k, db=db, gather_a=(src, w))
    want, want_b = _wgrad_reference(go[src // k], h, counts, w.flatten()[src])
    assert rel_err(out.cpu(), want.cpu()) < TOL[dtype] and rel_err(db.cpu(), want_b.cpu()) < TOL[dtype]
    assert made and all(d is not None for d in made), made


def test_weight_gradient_operands_tma_cannot_read_fall_back():
    tile = Tile(16, 16, 16, 4, 2, tma=True)
    a, b = torch.randn(40, 24, device=DEVICE), torch.randn(40, 40, device=DEVICE)
    assert wgrad_kernel._descs(a, None, b, tile) is not None
    assert wgrad_kernel._descs(a, None, b, Tile(16, 16, 16, 4, 2)) is None             # not asked for
    assert wgrad_kernel._descs(padded((40, 24), torch.float32, pad=3), None, b, tile) is None   # rows misaligned
    assert wgrad_kernel._descs(a, None, b[:, ::2], tile) is None                       # a column stride of 2
