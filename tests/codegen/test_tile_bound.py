"""The grid bound of the grouped GEMMs (`max_tiles`) covers every tile any routing can make."""
import random

import triton

from moec.codegen.jit_helpers import max_tiles


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
