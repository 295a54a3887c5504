"""The grouped GEMMs' grid: its bound (`max_tiles`) covers every tile any routing can make, and its
order (`grouped_order`) visits each (m, n) tile once."""
import random

import pytest
import torch
import triton
import triton.language as tl

from moec.codegen.jit_helpers import grouped_order, max_tiles

from kernel_helpers import DEVICE


def _tiles(counts, block_m):
    return sum(triton.cdiv(c, block_m) for c in counts)


def test_max_tiles_bounds_every_routing():
    rng = random.Random()
    for _ in range(2000):
        E, block_m = rng.randint(1, 300), rng.choice((1, 16, 32, 64, 128))
        S = rng.choice((0, 1, 2, rng.randint(1, 64), rng.randint(1, 5000)))
        shape = rng.choice(("one", "spread", "random"))
        counts = [0] * E
        if shape == "one":
            counts[rng.randrange(E)] = S
        elif shape == "spread":
            for i in range(S):
                counts[i % E] += 1
        else:
            for _ in range(S):
                counts[rng.randrange(E)] += 1
        assert _tiles(counts, block_m) <= max_tiles(S, E, block_m), (E, block_m, S, shape)


def test_max_tiles_is_tight_at_decode_sizes():
    # 8 copies on 8 distinct experts of 128 need 8 tiles, not 129
    assert max_tiles(8, 128, 16) == 8
    assert _tiles([1] * 8 + [0] * 120, 16) == 8


@triton.jit
def _order_kernel(out_ptr, n_n, m_tiles, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    tile, pid_n = grouped_order(pid, n_n, m_tiles, GROUP)
    tl.store(out_ptr + pid * 2, tile)
    tl.store(out_ptr + pid * 2 + 1, pid_n)


@pytest.mark.parametrize("m_tiles,n_n,group", [(1, 1, 8), (13, 3, 8), (8, 5, 8), (17, 2, 4), (3, 7, 8)])
def test_grouped_order_visits_every_tile_once(m_tiles, n_n, group):
    out = torch.empty(m_tiles * n_n, 2, dtype=torch.int32, device=DEVICE)
    _order_kernel[(m_tiles * n_n,)](out, n_n, m_tiles, GROUP=group)
    pairs = {tuple(p) for p in out.cpu().tolist()}
    assert pairs == {(m, n) for m in range(m_tiles) for n in range(n_n)}
    # the first `group` programs share one n tile (one weight tile) over consecutive m tiles
    first = out[:min(group, m_tiles)].cpu()
    assert (first[:, 1] == 0).all() and first[:, 0].tolist() == list(range(len(first)))
