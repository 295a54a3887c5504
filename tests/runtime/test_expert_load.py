"""runtime/expert_load.py: one step's counts from moec.plan's offsets, dropped copies, slots, and counts
under expert parallelism."""
import copy

import torch
import torch.nn.functional as F

import moec
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


def ep_rank_counts_its_own_tokens(rank, ws):
    """With the experts spread over the group, each rank counts the copies its own tokens route
    to every expert (all E of them), and the layer still matches the single-process block."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
    from hf_models import moe_block
    torch._dynamo.reset()
    block = moe_block("mixtral", "batched_mm")
    compiled = torch.compile(copy.deepcopy(block), backend="moec",
                             options={"dense_backend": "aot_eager", "ep_group": "world", "expert_stats": True})
    x = torch.randn(1, 5 + rank, 32, generator=torch.Generator().manual_seed(rank))
    torch.testing.assert_close(compiled(x), block(x))
    ids = torch.topk(torch.softmax(F.linear(x.reshape(-1, 32), block.gate.weight), -1), 2, dim=-1).indices
    [load] = moec.stats(compiled).values()
    assert load.counts.tolist() == torch.bincount(ids.flatten(), minlength=4).tolist()


def test_expert_parallel_ranks_count_their_own_tokens(pool2):
    pool2.run(ep_rank_counts_its_own_tokens, timeout=120)
