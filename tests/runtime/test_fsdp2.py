"""FSDP2 (`fully_shard`) with moec: a tiny Hugging Face MoE causal LM, its decoder layers sharded
over 2 gloo ranks and compiled with backend="moec" (per block, as torchtitan does, or the whole
model), trains a few AdamW steps to the losses and parameters of the single-process eager model
on the same global batch, each rank taking half of it.

FSDP2 swaps plain unsharded tensors into the modules for forward and backward, so Dynamo and moec
see ordinary parameters: the MoE layers are fused (counted) and each layer compiles once. An
expert that none of one rank's tokens choose leaves that rank's reduce-scatters in step with the
other's: its gradient is a zero slice, not a missing one (the pool's deadline turns a hang into a
failure)."""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing import assert_close

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))

STEPS, BATCH, SEQ = 3, 4, 8
STARVED = 0                  # the expert rank 0's tokens never choose, with steer=True
OPTIONS = {"dense_backend": "aot_eager"}


def trains_like_single_process(rank, ws, arch, compile_how, steer):
    from hf_models import causal_lm
    torch._dynamo.reset()
    counters.clear()
    ref = causal_lm(arch).double().train()
    ref.config.use_cache = False
    ids = _batch(steer)
    if steer:
        _steer_expert(ref)
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (ws,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if compile_how == "layers":
        for layer in model.model.layers:
            layer.compile(backend="moec", options=OPTIONS)
        run = model
    else:
        run = torch.compile(model, backend="moec", options=OPTIONS)
    chosen = _record_routing(ref)
    mine = ids.chunk(ws)[rank]
    opt_ref, opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model))
    for step in range(STEPS):
        expected = ref(ids, labels=ids).loss
        expected.backward()
        with torch.profiler.profile() as prof:
            loss = run(mine, labels=mine).loss
        loss.backward()
        # one fused op per layer: experts_combine (no expert parallelism here, so fuse_combine applies)
        fused_calls = sum(e.count for e in prof.key_averages() if e.key == "moec::experts_combine")
        if step:    # step 0 also traces and proves the layers, calling the op on fake and test inputs
            assert fused_calls == ref.config.num_hidden_layers, \
                f"step {step}: {fused_calls} moec::experts_combine calls"
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad()
        got = loss.detach().clone()
        dist.all_reduce(got)
        assert_close(got / ws, expected.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"loss at step {step}: {m}")
    # HF casts to float32 in its norms and routers, and Adam turns that rounding into steps of up to
    # ~2e-5 (transformers 5.25, one router element) where a gradient is near zero; atol is a
    # hundredth of one step (lr): a lost or doubled gradient would be off by a whole one.
    for (name, p), (name_sharded, q) in zip(ref.named_parameters(), model.named_parameters()):
        assert name == name_sharded
        assert_close(q.full_tensor(), p.detach(), rtol=1e-4, atol=1e-4,
                     msg=lambda m: f"{name} after {STEPS} steps: {m}")
    if steer:
        _check_starved(chosen, ws)
    # Dynamo lifts parameters into graph inputs, so blocks of one class share one compiled graph;
    # compiled once, not once per step.
    if compile_how == "layers":
        assert dict(counters["moec"]) == {"graphs": 1, "regions_fused": 1}, dict(counters["moec"])
    else:
        assert counters["moec"]["regions_fused"] >= 1, dict(counters["moec"])


def _batch(steer):
    g = torch.Generator().manual_seed(1)
    if not steer:
        return torch.randint(3, 96, (BATCH, SEQ), generator=g)
    # Rank 0's sequences use ids [3, 50), rank 1's [50, 96): `_steer_expert` tells them apart.
    half = BATCH // 2
    return torch.cat([torch.randint(3, 50, (half, SEQ), generator=g), torch.randint(50, 96, (half, SEQ), generator=g)])


def _steer_expert(model, channel=0):
    """Make hidden channel `channel` carry the id range's sign through the residual stream and
    every router's row STARVED read only it: ids below 50 never choose expert STARVED, ids from 50
    mostly do. The embedding's other channels are 0.02-scale; -1 dominates them (logit about -11),
    0.05 only leads them (about +4.6), so no softmax saturates into gradients at rounding level,
    which Adam would blow up into visibly different steps."""
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, channel] = torch.where(torch.arange(emb.shape[0]) < 50, -1.0, 0.05)
        for layer in model.model.layers:
            row = layer.mlp.gate.weight[STARVED]
            row.zero_()
            row[channel] = 2.0


def _record_routing(model):
    """Every MoE layer's top-k ids, per forward of `model`, in a list."""
    chosen = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda mod, args, out: chosen.append(out[2].detach()))
    return chosen


def _check_starved(chosen, ws):
    """The steering held in every layer and step: rank 0's tokens never chose STARVED, the others' did."""
    assert chosen
    for ids in chosen:                                  # (BATCH * SEQ, k), batch-major like the ranks' halves
        halves = ids.chunk(ws)
        assert not (halves[0] == STARVED).any()
        assert all((h == STARVED).any() for h in halves[1:])


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fsdp2_per_block_compile_trains_like_single_process(pool2, arch):
    pool2.run(trains_like_single_process, arch, "layers", False, timeout=180)


def test_fsdp2_whole_model_compile_trains_like_single_process(pool2):
    """FSDP2's hooks graph-break (they are dynamo-disabled), so each block is its own graph(s)."""
    pool2.run(trains_like_single_process, "qwen3_moe", "model", False, timeout=180)


def test_expert_starved_on_one_rank_neither_hangs_nor_drifts(pool2):
    pool2.run(trains_like_single_process, "qwen3_moe", "layers", True, timeout=180)
