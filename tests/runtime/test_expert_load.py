"""runtime/expert_load.py: one step's counts from moec.plan's offsets, dropped copies, slots."""
import torch

import moec.codegen  # noqa: F401  (registers moec.plan)
from moec.runtime import expert_load


def test_step_counts_copies_per_expert_and_dropped():
    torch.manual_seed(0)
    E, T, k = 6, 23, 2
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])      # (T, k), distinct per token
    ids[torch.rand(T, k) < 0.3] = -1                                  # capacity drops
    offsets = torch.ops.moec.plan(ids, E)[0]
    step = torch.ops.moec.expert_load_step(offsets, ids)
    kept = ids[ids >= 0]
    want = torch.cat([torch.bincount(kept, minlength=E), torch.tensor([(ids < 0).sum(), 1])])
    assert (ids < 0).any()
    torch.testing.assert_close(step, want, rtol=0, atol=0)


def test_record_adds_in_place_and_other_instances_get_their_own_slot():
    owner, other = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3, 2))
    slot = expert_load.register("layers.9.mlp", owner, "layers.9.mlp.w", 3, "cpu", 0)
    load = expert_load.slot(slot).load
    before = load.clone()
    step = torch.tensor([4, 0, 2, 1, 1])
    torch.ops.moec.expert_load_record(load, step, owner, slot)
    torch.testing.assert_close(load, before + step, rtol=0, atol=0)
    assert expert_load.register("layers.9.mlp", owner, "layers.9.mlp.w", 3, "cpu", 0) == slot   # a recompile
    # the same compiled graph run with another instance's weights (per-block compile)
    torch.ops.moec.expert_load_record(load, step * 2, other, slot)
    torch.testing.assert_close(load, before + step, rtol=0, atol=0)
    mine = expert_load.register("layers.9.mlp", other, "layers.9.mlp.w", 3, "cpu", 0)
    assert mine != slot and expert_load.slot(mine).load.tolist() == (step * 2).tolist()
