"""runtime/shard.py: expert weights become DTensor Shard(0) over the EP group; meta models too;
EP over the 'ep' dimension of a 2-D mesh (two EP groups side by side) matches single-process; and
a sharded HF block keeps its code: it runs eager (gathering its weights inside forward), and
compiled with its layer left unfused or fused without expert parallelism, while optimizers and
state_dict see the DTensors."""
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.testing import assert_close

from moe_ops import H, Experts, moe
from moec.codegen.torch_release import TORCH_RELEASE
from moec.runtime import shard_experts

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))


def shards_real_and_meta(rank, ws):
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    torch.manual_seed(rank)                       # different init per rank: rank 0's wins
    model = torch.nn.Sequential(torch.nn.Linear(H, 4), Experts(4))
    rank0 = [p.detach().clone() for p in model[1].weights() if p is not None]
    dist.broadcast_object_list(rank0, src=0)
    names = shard_experts(model, mesh)
    assert names == [f"1.{n}" for n in ("w_up", "w_down", "w_gate", "b_up", "b_gate", "b_down")]
    assert not isinstance(model[0].weight, DTensor)           # (4, H) has no 3-D sibling: not an expert
    for p, want in zip([p for p in model[1].weights() if p is not None], rank0):
        assert p.placements == (Shard(0),) and p.to_local().shape[0] == 4 // ws
        assert_close(p.full_tensor(), want)
    with torch.device("meta"):
        meta = Experts(8)
    shard_experts(meta, mesh)
    assert meta.w_up.shape == (8, 6, H) and meta.w_up.to_local().shape == (8 // ws, 6, H)
    meta.to_empty(device="cpu")
    assert meta.w_up.to_local().device.type == "cpu" and isinstance(meta.w_up, DTensor)


def test_shard_real_and_meta_models(pool2):
    pool2.run(shards_real_and_meta)


def ep_on_a_2d_mesh(rank, ws):
    mesh = init_device_mesh("cpu", (2, ws // 2), mesh_dim_names=("dp", "ep"))
    torch.manual_seed(0)
    ref = Experts(4)
    ep = copy.deepcopy(ref)
    shard_experts(ep, mesh)
    g = torch.Generator().manual_seed(rank)
    x, logits = torch.randn(5, H, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    out_ref = moe(x, logits, 2, ref)
    out_ep = moe(x, logits, 2, ep, group_name=mesh["ep"].get_group().group_name)
    assert_close(out_ep, out_ref)
    out_ep.sum().backward()
    out_ref.sum().backward()
    want = ref.w_up.grad.clone()
    dist.all_reduce(want, group=mesh["ep"].get_group())        # tokens of this EP group only
    assert_close(ep.w_up.grad.full_tensor(), want)


def test_ep_over_the_ep_dim_of_a_2d_mesh(pool4):
    pool4.run(ep_on_a_2d_mesh)


def sharded_hf_block_keeps_its_code(rank, ws):
    from hf_models import moe_block
    torch._dynamo.reset()
    counters.clear()
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    ref = moe_block("qwen3_moe")
    block = copy.deepcopy(ref)
    experts_class = type(block.experts)
    names = shard_experts(block, mesh)
    assert names == ["experts.gate_up_proj", "experts.down_proj"]
    assert isinstance(block.experts, experts_class) and type(block.experts).__name__ == f"Sharded{experts_class.__name__}"
    assert isinstance(block.experts.gate_up_proj, DTensor)                     # outside forward: the parameter
    state = block.state_dict()
    assert list(state) == list(ref.state_dict()) and all(isinstance(state[n], DTensor) for n in names)
    x = torch.randn(1, 5 + rank, 32, generator=torch.Generator().manual_seed(rank))
    # eager: the unchanged HF loop reads the gathered weights; rewrite disabled: the gathers stay in
    # the graph; no ep_group: moec's single-process experts read the gathered weights
    unfused = torch.compile(block, backend="moec", options={"dense_backend": "aot_eager", "ep_group": mesh,
                                                            "disable": ("rewrite",)})
    # moec traces HF's eager experts as grouped_mm, which for float32 weights is transformers' fallback op:
    # torch 2.11's AOT autograd cannot trace its backward (`offs.tolist()`; moec or not), so there the
    # unrewritten graph traces them as batched_mm
    os.environ["MOEC_HF_EAGER_EXPERTS_AS"] = "grouped_mm" if TORCH_RELEASE >= (2, 13) else "batched_mm"
    try:
        results = [_forward_backward(fn, m, x) for fn, m in ((ref, ref), (block, block), (unfused, block))]
    finally:
        del os.environ["MOEC_HF_EAGER_EXPERTS_AS"]
    torch._dynamo.reset()
    no_ep = torch.compile(block, backend="moec", options={"dense_backend": "aot_eager"})
    results.append(_forward_backward(no_ep, block, x))
    assert counters["moec"]["regions_fused"] == 1
    (out_ref, gx_ref, grads_ref) = results[0]
    for out, gx, grads in results[1:]:
        assert_close(out, out_ref)
        assert_close(gx, gx_ref)
        for name in names:
            want = grads_ref[name].clone()
            dist.all_reduce(want)             # each rank's tokens: the sharded grad holds their sum
            assert_close(grads[name].full_tensor(), want, msg=name)
    torch.optim.AdamW(block.parameters(), lr=1e-2).step()
    assert block.experts.down_proj.placements == (Shard(0),)
    assert block.experts.down_proj.to_local().shape[0] == block.experts.num_experts // ws


def _forward_backward(fn, module, x):
    module.zero_grad()
    x = x.clone().requires_grad_()
    out = fn(x)
    out.square().sum().backward()
    return out, x.grad, {n: p.grad for n, p in module.named_parameters()}


def test_sharded_hf_block_runs_eager_and_unfused(pool2):
    pool2.run(sharded_hf_block_keeps_its_code, timeout=120)
