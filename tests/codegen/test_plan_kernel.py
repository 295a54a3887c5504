import pytest
import torch

from moec.codegen import reference
from moec.codegen.plan_kernel import plan_launch

from kernel_helpers import DEVICE


def _check(ids, E, **kw):
    got = plan_launch(ids, E, **kw) if kw else torch.ops.moec.plan(ids, E)
    want = reference.plan(ids.cpu(), E)
    for name, a, b in zip(("offsets", "src", "inv"), got, want):
        assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (1, 4, 1), (37, 8, 2), (13, 6, 6), (50, 5, 3), (9, 64, 8)])
@pytest.mark.parametrize("chunks", [None, 0])   # the launch's choice (one program at these sizes), two launches
def test_matches_stable_sort(T, E, k, chunks):
    kw = {} if chunks is None else {"single_max_chunks": chunks}
    _check(torch.randint(0, E, (T, k), device=DEVICE), E, **kw)


def test_dropped_ids_and_empty_experts():
    ids = torch.randint(-2, 3, (40, 2), device=DEVICE)       # experts 3..6 empty, negatives dropped
    ids[0, 0] = 7
    _check(ids, 7)
    _check(ids, 7, single_max_chunks=0)


def test_every_copy_on_one_expert_int32():
    _check(torch.full((29, 3), 2, dtype=torch.int32, device=DEVICE), 4)


def test_many_blocks_ragged_tail():
    # small sub-chunks and few copies per block force the multi-block prefix and a partial tail
    _check(torch.randint(0, 5, (211, 3), device=DEVICE), 5, sub=16, max_blocks=7)
