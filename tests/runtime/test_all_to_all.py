"""runtime/all_to_all.py: uneven and zero splits, the count exchange, and the backward (the
reverse all-to-all) on 4 gloo ranks."""
import torch
import torch.distributed as dist
from torch.testing import assert_close

from moec.runtime.all_to_all import all_to_all, exchange_counts, host_splits


def _rows(i, j, n):
    """The n rows rank i sends rank j: values that say where they came from."""
    return torch.full((n, 3), 100.0 * i + j, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)[:, None]


def uneven_exchange(rank, ws):
    name = dist.group.WORLD.group_name
    n = lambda i, j: (i + 2 * j) % 3           # 0, 1 or 2 rows; rank 0 sends itself none
    send = [n(rank, j) for j in range(ws)]
    recv = [n(i, rank) for i in range(ws)]
    x = torch.cat([_rows(rank, j, send[j]) for j in range(ws)]).requires_grad_()
    counts = torch.tensor([c for s in send for c in (s // 2, s - s // 2)])   # 2 experts per rank
    got_counts, strangers = exchange_counts(counts, name, ws, 7)         # (ws, 2), ()
    assert host_splits(got_counts.sum(1)) == recv and strangers.item() == 0
    y = all_to_all(x, recv, send, name, "dispatch")
    assert_close(y, torch.cat([_rows(i, rank, recv[i]) for i in range(ws)]))
    (y * (rank + 1)).sum().backward()                                    # grad flows back to the sender
    want = torch.cat([torch.full((send[j], 3), j + 1.0, dtype=torch.float64) for j in range(ws)])
    assert_close(x.grad, want)


def test_uneven_and_zero_splits(pool4):
    pool4.run(uneven_exchange)


def out_of_step(rank, ws):
    """Ranks exchanging counts at different points of their programs (another tag) are counted."""
    counts = torch.randint(0, 5, (2 * ws,))
    got, strangers = exchange_counts(counts, dist.group.WORLD.group_name, ws, 100 + (rank == 2))
    return got.shape, strangers.item()


def test_count_exchange_counts_ranks_out_of_step(pool4):
    results = pool4.run(out_of_step)
    assert results == [((4, 2), 1), ((4, 2), 1), ((4, 2), 3), ((4, 2), 1)], results


def nothing_anywhere(rank, ws):
    x = torch.zeros(0, 3, requires_grad=True)
    y = all_to_all(x, [0] * ws, [0] * ws, dist.group.WORLD.group_name, "dispatch")
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 3)


def test_all_zero_exchange(pool2):
    pool2.run(nothing_anywhere)
