"""Failures across ranks surface as clear MoecErrors, not hangs: a rank that stops taking part
(bounded by the process group's timeout) and ranks that compiled different MoE layers."""
import time

import pytest
import torch
import torch.distributed as dist

from dist_pool import RankPool
from moe_ops import H, Experts, moe
from moec.codegen.errors import MoecError
from moec.runtime.consistency import forget

PG_TIMEOUT_S = 2.0


def _step(rank, k=2, site="layers.0.mlp", T=4, E=4):
    torch.manual_seed(0)
    experts = Experts(E)
    g = torch.Generator().manual_seed(rank)
    x, logits = torch.randn(T, H, generator=g, dtype=torch.float64), torch.randn(T, E, generator=g, dtype=torch.float64)
    return moe(x, logits, k, experts, group_name=dist.group.WORLD.group_name, site=site)


def hang_on_second_step(rank, ws):
    _step(rank)                              # both ranks agree on the layer and run it once
    if rank == 1:
        time.sleep(PG_TIMEOUT_S + 0.5)         # then rank 1 stops taking part
        return None
    start = time.monotonic()
    with pytest.raises(MoecError, match="another rank did not take part in time or has died"):
        _step(rank)
    return time.monotonic() - start


def test_hung_rank_fails_the_others_within_the_timeout():
    pool = RankPool(2, pg_timeout_s=PG_TIMEOUT_S)
    try:
        waited, _ = pool.run(hang_on_second_step, timeout=30)
    finally:
        pool.close(graceful=False)   # the group is broken after a timeout
    assert PG_TIMEOUT_S * 0.5 <= waited < PG_TIMEOUT_S + 5


def different_layers(rank, ws, what):
    forget()    # this pool's ranks may have agreed on these layers in an earlier test
    kwargs = {"k": dict(k=2 if rank == 0 else 1), "site": dict(site=f"layers.{rank}.mlp")}[what]
    with pytest.raises(MoecError, match=r"compiled different MoE layers:\n  rank 0: layer .*\n  rank 1: "):
        _step(rank, **kwargs)


@pytest.mark.parametrize("what", ["k", "site"])
def test_ranks_with_different_layers_fail_at_first_step(pool2, what):
    pool2.run(different_layers, what)
