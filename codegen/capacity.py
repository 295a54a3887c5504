"""`moec.capacity_keep`: which token copies fit in their expert's capacity (Switch/GShard/DeepSpeed).

Capacity routing keeps, per expert, the first `capacity` copies routed to it and drops the rest
(their expert output is zero). "First" is counted in one of two orders:

    choice_major  all tokens' first choices (in token order), then all second choices, ...
                  (GShard, DeepSpeed top-2: a token's first choice outranks anyone's second)
    token_major   token by token, each token's choices in order

The op returns only the mask; the rewrite applies it (ids of dropped copies -> -1, which
`moec.plan` drops; weights masked and optionally renormalised) with ordinary, differentiable
ops that the dense backend fuses. No host synchronisation: a cumulative sum on the device.
"""
import torch
from torch import Tensor

from .dispatch import moec_op
from .errors import MoecKernelError

ORDERS = ("choice_major", "token_major")


@moec_op("capacity_keep")
def capacity_keep(ids: Tensor, num_experts: int, capacity: int, order: str) -> Tensor:
    """ids (T, k) int -> keep (T, k) bool."""
    _check(ids, num_experts, order)
    return reference_capacity_keep(ids, num_experts, capacity, order)


@capacity_keep.register_fake
def _(ids, num_experts, capacity, order):
    _check(ids, num_experts, order)
    return torch.empty_like(ids, dtype=torch.bool)


def reference_capacity_keep(ids_Tk, num_experts, capacity, order):
    """Position of each copy among the copies its expert receives, counted in `order`, < capacity.
    Bytes: reads T*k ids, builds a (T*k, E) one-hot in int32 (a kernel would keep E counters)."""
    T, k = ids_Tk.shape
    valid = (ids_Tk >= 0) & (ids_Tk < num_experts)
    onehot = torch.nn.functional.one_hot(torch.where(valid, ids_Tk, 0), num_experts).to(torch.int32)
    onehot = onehot * valid.unsqueeze(-1)                                    # (T, k, E)
    seq = onehot.transpose(0, 1) if order == "choice_major" else onehot     # (k, T, E) or (T, k, E)
    seq = seq.reshape(-1, num_experts)
    position = ((seq.cumsum(0) - seq) * seq).sum(-1)                         # earlier copies, same expert
    position = position.view(k, T).transpose(0, 1) if order == "choice_major" else position.view(T, k)
    return valid & (position < capacity)


def _check(ids, num_experts, order):
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
        raise MoecKernelError(f"moec.capacity_keep: ids must be a (tokens, k) int32/int64 tensor, got "
                              f"{ids.dtype} of shape {tuple(ids.shape)}")
    if order not in ORDERS:
        raise MoecKernelError(f"moec.capacity_keep: order={order!r}; expected one of {ORDERS}")
    if num_experts < 1:
        raise MoecKernelError(f"moec.capacity_keep: num_experts={num_experts}; need at least one expert")
