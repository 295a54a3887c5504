"""Dispatch and combine all-to-alls for expert parallelism, with autograd.

Built on PyTorch's traceable functional collectives (`_c10d_functional.all_to_all_single` +
`wait_tensor`), so that under torch.compile they are graph nodes a later pass can move; in
eager they run as ordinary collectives. Groups are passed by c10d group name, which is what a
graph node can carry.

Two ways to size the exchange:
- dropless: split sizes differ per step. The per-expert counts travel on the device
  (`exchange_counts`, equal splits), but `all_to_all_single` needs the row splits on the host,
  so `host_splits` copies them there: ONE unavoidable device->host sync per MoE layer per
  forward (the backward reuses the same host lists). An all-to-all whose splits stay on the
  device (NVSHMEM `all_to_all_vdev`) would remove it; gloo has none.
- capacity: every (rank, expert) pair exchanges exactly C rows, padded; no counts, no sync,
  static shapes.

Zero rows sent or received are fine: a split of 0 is a valid split, and an all-zero exchange
still runs the collective so that every rank takes part.
"""
import contextlib

import torch
import torch.distributed._functional_collectives as fc
from torch import Tensor

from moec.codegen.errors import MoecError


def exchange_counts(counts_E: Tensor, group_name: str, ep: int, tag: int) -> tuple:
    """counts (E,) int64: copies this rank sends to each global expert ->
    (recv (ep, E/ep): recv[j, e] = copies rank j sends to this rank's local expert e,
     strangers (): how many ranks sent another `tag` than this rank's).
    The tag (the same on every rank for one exchange point, see `consistency.tag`) catches ranks
    whose collectives are out of step; it also keeps two exchanges of equal counts apart: a
    rewrite that merges equal pure ops (AOT autograd's CSE) merged the exchanges of two empty
    chunks on a rank that had them, one collective fewer than its peers."""
    send = torch.cat([counts_E.view(ep, -1), counts_E.new_full((ep, 1), tag)], 1)      # (ep, El + 1)
    with _clear_errors("count exchange", group_name):
        recv = _waited(fc.all_to_all_single(send.reshape(-1), None, None, group_name)).view(ep, -1)
    return recv[:, :-1], (recv[:, -1] != tag).sum()


def host_splits(per_rank: Tensor) -> list:
    """(ep,) row counts -> a Python list: the dropless mode's device->host sync, in one place."""
    with _clear_errors("split sizes", ""):
        return per_rank.tolist()


def all_to_all(rows: Tensor, out_splits: list | None, in_splits: list | None, group_name: str,
               what: str) -> Tensor:
    """rows (sum(in_splits), H) -> (sum(out_splits), H); rank j's block of in_splits[j] rows goes
    to rank j, arriving in rank order. None splits mean equal blocks. Differentiable: the
    backward is the reverse all-to-all (splits swapped)."""
    with _clear_errors(what, group_name):
        return _waited(fc.all_to_all_single_autograd(rows.contiguous(), out_splits, in_splits, group_name))


def all_to_all_start(rows: Tensor, out_splits: list | None, in_splits: list | None, group_name: str,
                     ep: int) -> Tensor:
    """`all_to_all` without the wait: the rows are in flight until `wait(result)`, so compute placed
    between the two overlaps the exchange (under torch.compile the wait_tensor node lands where
    `wait` is called, not right after the collective as `fc.all_to_all_single` puts it).
    Differentiable; the backward's reverse all-to-all waits at once."""
    if out_splits is None:                                 # equal blocks: the op wants explicit splits
        out_splits = in_splits = [rows.shape[0] // ep] * ep
    return _Start.apply(rows.contiguous(), out_splits, in_splits, group_name)


class _Start(torch.autograd.Function):
    # The plain functional collective, not _c10d_functional_autograd's: Inductor knows the former
    # is in flight until its wait_tensor and keeps its buffers alive until then; the latter is an
    # opaque op to it, whose send buffer it reused for other values while the exchange still read
    # it (wrong results as soon as compute ran between start and wait).
    @staticmethod
    def forward(ctx, rows, out_splits, in_splits, group_name):
        ctx.splits = (out_splits, in_splits, group_name)
        return torch.ops._c10d_functional.all_to_all_single(rows, out_splits, in_splits, group_name)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group_name = ctx.splits
        back = torch.ops._c10d_functional.all_to_all_single(grad.contiguous(), in_splits, out_splits, group_name)
        return torch.ops._c10d_functional.wait_tensor(back), None, None, None


def wait(t: Tensor, what: str = "all-to-all", group_name: str = "") -> Tensor:
    """The result of `all_to_all_start`, once it has arrived."""
    with _clear_errors(what, group_name):
        return _Wait.apply(t)


class _Wait(torch.autograd.Function):
    # wait_tensor's own autograd formula is not registered on every supported torch version;
    # the gradient of a wait is the gradient itself.
    @staticmethod
    def forward(ctx, t):
        return torch.ops._c10d_functional.wait_tensor(t)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _waited(t: Tensor) -> Tensor:
    # In eager the collective returns lazily; wait here so a timeout surfaces inside
    # `_clear_errors`. Under tracing the result is already followed by a wait_tensor node.
    return t.wait() if isinstance(t, fc.AsyncCollectiveTensor) else t


_PEER_FAILURES = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


@contextlib.contextmanager
def _clear_errors(what: str, group_name: str):
    """Turn a collective's transport error (a rank that hangs or died) into a MoecError saying what
    to check. Applies in eager; compiled graphs surface the backend's own error."""
    try:
        yield
    except RuntimeError as e:
        text = str(e).lower()
        if isinstance(e, MoecError) or not any(s in text for s in _PEER_FAILURES):
            raise
        group = f" on process group {group_name!r}" if group_name else ""
        raise MoecError(
            f"expert-parallel {what}{group} failed: another rank did not take part in time or has died "
            f"({str(e).strip().splitlines()[0]}). Check that every rank of the expert-parallel group runs "
            f"the same MoE layers each step and that none crashed or hung; the wait is bounded by the "
            f"`timeout` given to init_process_group / new_group.") from e
