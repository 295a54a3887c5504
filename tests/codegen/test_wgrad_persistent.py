"""The persistent weight-gradient kernel (Tile.persistent, codegen/wgrad_persistent_kernel.py) against
float64 references: programs that each walk several tiles across experts of every length (empty,
one row, partial, whole blocks, blocks and a tail), dual, gathered rows of either operand, outputs
written transposed into strided views, bias gradients from the kernel launched beside it (weighted
rows too); and chunked copies staying on the per-tile kernel."""
import pytest
import torch

from moec.codegen import wgrad_kernel
from moec.codegen.tuning import Tile

from kernel_helpers import DEVICE, TOL, rel_err
from test_tma_weights import _wgrad_reference

COUNTS = [0, 5, 16, 33, 1, 0, 47, 32, 0]


def _launched(monkeypatch):
    seen = []
    real = wgrad_kernel.launch

    def spy(kernel, grid, *args, **kw):
        seen.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, grid))
        return real(kernel, grid, *args, **kw)
    monkeypatch.setattr(wgrad_kernel, "launch", spy)
    return seen


def _setup(dtype, M, N, k=2, counts=COUNTS):
    S = sum(counts)
    offsets = torch.tensor([0] + counts, device=DEVICE).cumsum(0)
    new = lambda *shape: torch.randn(*shape, device=DEVICE).to(dtype)      # noqa: E731
    return S, offsets, torch.randperm(S, device=DEVICE), new


def _dual_and_gathered(dtype, tile):
    """launch_wgrad at `tile` against float64: dual (du, dg against x gathered by token), then a
    gathered a (dW_down: grad_out's rows by token) written transposed into a (E, N, M) buffer's
    view. -> (E, M, N)."""
    k, M, N = 2, 24, 40
    S, offsets, src, new = _setup(dtype, M, N, k)
    E = len(COUNTS)
    x, du, dg = new(S // k + 1, N), new(S, M), new(S, M)
    out, out2 = [torch.full((E, M, N), float("nan"), device=DEVICE, dtype=dtype) for _ in range(2)]
    wgrad_kernel.launch_wgrad(du, x, offsets, out, tile, src=src, k=k, a2=dg, out2=out2)
    rows = x[src // k]
    for got, a in ((out, du), (out2, dg)):
        assert rel_err(got.cpu(), _wgrad_reference(a, rows, COUNTS)[0].cpu()) < TOL[dtype]
    go, h = new(S // k + 1, M), new(S, N)
    w = torch.rand(S // k + 1, k, device=DEVICE).to(dtype)
    base = torch.full((E, N, M), float("nan"), device=DEVICE, dtype=dtype)
    wgrad_kernel.launch_wgrad(go, h, offsets, base.transpose(1, 2), tile, k=k, gather_a=(src, w))
    want = _wgrad_reference(go[src // k], h, COUNTS)[0]
    assert rel_err(base.transpose(1, 2).cpu(), want.cpu()) < TOL[dtype]
    return E, M, N


def _biases(tile):
    """launch_wgrad at `tile` with bias gradients, float32 against float64: dual with both biases,
    then a gathered a whose bias sums are weighted by the routing weights (two launches)."""
    dtype, k, M, N = torch.float32, 2, 24, 40
    S, offsets, src, new = _setup(dtype, M, N, k)
    E = len(COUNTS)
    x, du, dg = new(S // k + 1, N), new(S, M), new(S, M)
    out, out2 = torch.empty(E, M, N, device=DEVICE), torch.empty(E, M, N, device=DEVICE)
    db, db2 = torch.full((E, M), float("nan"), device=DEVICE), torch.full((E, M), float("nan"), device=DEVICE)
    wgrad_kernel.launch_wgrad(du, x, offsets, out, tile, src=src, k=k, a2=dg, out2=out2, db=db, db2=db2)
    for got, got_b, a in ((out, db, du), (out2, db2, dg)):
        want, want_b = _wgrad_reference(a, x[src // k], COUNTS)
        assert rel_err(got.cpu(), want.cpu()) < TOL[dtype] and rel_err(got_b.cpu(), want_b.cpu()) < TOL[dtype]
    go, h = new(S // k + 1, M), new(S, N)
    w = torch.rand(S // k + 1, k, device=DEVICE)
    wgrad_kernel.launch_wgrad(go, h, offsets, out, tile, k=k, db=db, gather_a=(src, w))
    want, want_b = _wgrad_reference(go[src // k], h, COUNTS, w.flatten()[src])
    assert rel_err(out.cpu(), want.cpu()) < TOL[dtype] and rel_err(db.cpu(), want_b.cpu()) < TOL[dtype]


def _chunked(monkeypatch, tile):
    """launch_wgrad at `tile` with its gathered copy in chunks of 24 rows (float32 against float64,
    with a bias)."""
    dtype, k, M, N = torch.float32, 2, 24, 40
    S, offsets, src, new = _setup(dtype, M, N, k)
    E = len(COUNTS)
    x, du = new(S // k + 1, N), new(S, M)
    out, db = torch.empty(E, M, N, device=DEVICE), torch.full((E, M), float("nan"), device=DEVICE)
    monkeypatch.setattr(wgrad_kernel, "MAX_COPY_BYTES", 24 * N * dtype.itemsize)
    wgrad_kernel.launch_wgrad(du, x, offsets, out, tile, src=src, k=k, db=db)
    want, want_b = _wgrad_reference(du, x[src // k], COUNTS)
    assert rel_err(out.cpu(), want.cpu()) < TOL[dtype] and rel_err(db.cpu(), want_b.cpu()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sm,tma", [(1, False), (3, False), (2, True)])
def test_persistent_dual_and_gathered(monkeypatch, dtype, per_sm, tma):
    seen = _launched(monkeypatch)
    stores = []
    real = wgrad_kernel._out_descs
    monkeypatch.setattr(wgrad_kernel, "_out_descs", lambda *a: stores.append(real(*a)) or stores[-1])
    tile = Tile(16, 16, 16, 4, 2, tma=tma, persistent=per_sm)
    E, M, N = _dual_and_gathered(dtype, tile)
    tiles = E * 2 * 3        # cdiv(24, 16) x cdiv(40, 16) per expert
    sms = wgrad_kernel._sms(torch.device(DEVICE))        # 2 stand-ins on the interpreter
    assert seen == [("wgrad_persistent_kernel", (min(tiles, sms * per_sm),))] * 2
    # with Tile.tma the tiles are stored through descriptors (TMA clips the partial edge tiles)
    assert [d is not None for d in stores] == [tma, tma]


def test_tma_stores_fall_back_where_a_descriptor_cannot_write():
    tile = Tile(16, 16, 16, 4, 2, tma=True, persistent=1)
    out = torch.empty(3, 24, 40, device=DEVICE)
    assert wgrad_kernel._out_descs(out, out, False, tile) is not None
    assert wgrad_kernel._out_descs(out.transpose(1, 2), out.transpose(1, 2), True, tile) is not None
    assert wgrad_kernel._out_descs(out, out, False, Tile(16, 16, 16, 4, 2, persistent=1)) is None   # not asked
    odd = torch.empty(3, 24, 41, device=DEVICE)[:, :, :40]           # rows 164 bytes apart
    assert wgrad_kernel._out_descs(odd, odd, False, tile) is None
    assert wgrad_kernel._out_descs(out, odd, False, tile) is None    # both or neither


def test_persistent_more_programs_than_tiles_and_no_rows(monkeypatch):
    seen = _launched(monkeypatch)
    tile = Tile(16, 16, 16, 4, 2, persistent=8)     # more programs than 2 experts x 1 tile
    M = N = 8
    for counts in ([3, 9], [0, 0]):
        S, offsets, _, new = _setup(torch.float32, M, N, counts=counts)
        a, b = new(S, M), new(S, N)
        out = torch.full((2, M, N), float("nan"), device=DEVICE)
        wgrad_kernel.launch_wgrad(a, b, offsets, out, tile)
        want = _wgrad_reference(a, b, counts)[0]
        if S:
            assert rel_err(out.cpu(), want.cpu()) < TOL[torch.float32]
        else:
            assert torch.equal(out.cpu(), torch.zeros(2, M, N))
    assert [name for name, _ in seen] == ["wgrad_persistent_kernel"] * 2 and seen[0][1] == (2,)


def test_biases_beside_and_chunks_on_the_per_tile_kernel(monkeypatch):
    seen = _launched(monkeypatch)
    tile = Tile(16, 16, 16, 4, 2, persistent=2)
    _biases(tile)
    assert [name for name, _ in seen] == ["wgrad_persistent_kernel", "bias_grad_kernel", "bias_grad_kernel",
                                          "wgrad_persistent_kernel", "bias_grad_kernel"]
    del seen[:]
    _chunked(monkeypatch, tile)
    assert {name for name, _ in seen} == {"wgrad_kernel"} and len(seen) > 2
