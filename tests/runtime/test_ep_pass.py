"""passes/expert_parallel.py: with `ep_group` set, torch.compile(backend="moec") runs each MoE
layer's experts spread over 2 gloo ranks and matches the single-process model, values and grads."""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh
from torch.testing import assert_close

import moec.pipeline
from moec.codegen.errors import MoecError
from moec.config import Config
from moec.runtime import shard_experts
from moec.runtime.consistency import forget
from moec.passes.expert_parallel import ExpertParallelReport, expert_parallel

sys.path.insert(0, str(Path(__file__).parents[1]))        # tests/: the shared MoE idioms
sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))

from moe_ops import summed  # noqa: E402


def _with_ep_pass():
    """Until moec/pipeline.py lists the pass, append it (the line the pipeline's owner will add)."""
    if all(name != "expert_parallel" for name, _ in moec.pipeline.PIPELINE):
        moec.pipeline.PIPELINE = moec.pipeline.PIPELINE + (("expert_parallel", expert_parallel),)


def _reports():
    from moec import session
    return [r.reports["expert_parallel"] for r in session.take() if "expert_parallel" in r.reports]


def compiled_matches_single_process(rank, ws, make, shapes, options, expert_params, sharded=False, starve=False):
    """Compile a copy of make()'s module with EP over every rank; compare with the plain module:
    outputs and input grads per rank, expert-weight grads summed over ranks (data parallel).
    sharded: the copy's expert weights are DTensors (shard_experts) first, whose grads are DTensors
    holding that sum; the compiled steps must run no gather of them. starve: rank 0's tokens
    never choose the experts rank 1 owns (the upper half), checked on the router's choices."""
    _with_ep_pass()
    torch._dynamo.reset()
    from moec import session
    session.clear()   # pool workers outlive tests: drop records of earlier jobs' compiles
    torch.manual_seed(0)
    ref = make()
    x = torch.randn(*shapes[rank], generator=torch.Generator().manual_seed(rank))
    if starve:
        _starve_upper_half(ref, x, rank)
    ep = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    if sharded:
        assert set(shard_experts(ep, mesh)) == expert_params
    compiled = torch.compile(ep, backend="moec", options={"dense_backend": "aot_eager", "ep_group": mesh, **options})
    outs = []
    for fn, mod in ((ref, ref), (compiled, ep)):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out = out[0] if isinstance(out, tuple) else out
        out.square().sum().backward()
        outs.append((out, xi.grad, {n: p.grad for n, p in mod.named_parameters()}))
    (out_ref, gx_ref, gp_ref), (out_ep, gx_ep, gp_ep) = outs
    assert_close(out_ep, out_ref)
    assert_close(gx_ep, gx_ref, msg="grad of x")
    for name, g in gp_ref.items():
        a, b = gp_ep[name], g.clone()
        if name in expert_params:       # each rank's grad covers its own tokens only
            dist.all_reduce(b)
            a = a.full_tensor() if sharded else summed(a)
        assert_close(a, b, msg=f"grad of {name}")
    reports = _reports()
    assert len(reports) == 1, [(r.size, r.layers) for r in reports]
    [report] = reports
    assert report.size == ws and len(report.layers) == 1
    assert len(report.sharded) == (len(expert_params) if sharded else 0), report
    if sharded:
        with torch.profiler.profile() as prof:
            compiled(x.clone().requires_grad_()).square().sum().backward()
        gathers = [e.key for e in prof.key_averages() if "all_gather" in e.key or "reduce_scatter" in e.key]
        assert not gathers, f"the compiled step gathered the sharded weights: {gathers}"


def _starve_upper_half(block, x, rank):
    """Routers read only hidden channel 0 for the upper half of the experts, which a positive
    channel 0 (rank 0's tokens) makes their lowest logits."""
    E = block.gate.weight.shape[0]
    with torch.no_grad():
        block.gate.weight[E // 2:] = 0
        block.gate.weight[E // 2:, 0] = -10.0
        if rank == 0:
            x[..., 0] = x[..., 0].abs() + 1
        chosen = block.gate(x.reshape(-1, x.shape[-1]))[2]
    assert (chosen >= E // 2).any() != (rank == 0), f"rank {rank} chose experts {chosen.unique().tolist()}"


def _mask_loop():
    from moe_idioms import MaskLoopMoE
    return MaskLoopMoE(hidden=8, ffn=6, experts=4, top_k=2)


@pytest.mark.parametrize("options", [{}, {"ep_capacity_factor": 8.0}], ids=["dropless", "capacity"])
def test_compiled_moe_matches_single_process(pool2, options):
    shapes = [(6, 8), (6, 8)] if options else [(5, 8), (6, 8)]   # capacity mode: same T everywhere
    pool2.run(compiled_matches_single_process, _mask_loop, shapes, options, {"gate_up", "down"}, timeout=120)


def _mixtral():
    from hf_models import moe_block
    return moe_block("mixtral")


def _qwen3_moe():
    from hf_models import moe_block
    return moe_block("qwen3_moe")


HF_EXPERTS = {"experts.gate_up_proj", "experts.down_proj"}


def test_compiled_hf_mixtral_block_matches_single_process(pool2):
    pool2.run(compiled_matches_single_process, _mixtral, [(1, 4, 32), (1, 6, 32)], {}, HF_EXPERTS, timeout=120)


@pytest.mark.parametrize("make", [_mixtral, _qwen3_moe], ids=["mixtral", "qwen3_moe"])
def test_compiled_hf_block_with_dtensor_experts_matches_single_process(pool2, make):
    """shard_experts' DTensor weights: the model code reads them gathered, moec hands the shards over."""
    pool2.run(compiled_matches_single_process, make, [(1, 4, 32), (1, 6, 32)], {}, HF_EXPERTS, True, timeout=120)


def test_compiled_dtensor_experts_with_an_expert_starved_on_one_rank(pool2):
    pool2.run(compiled_matches_single_process, _qwen3_moe, [(1, 5, 32), (1, 6, 32)], {}, HF_EXPERTS, True, True,
              timeout=120)


def causal_lm_per_block_matches_single_process(rank, ws):
    """torchtitan's way: each decoder layer compiled on its own (one graph serves both layers),
    expert weights sharded; the loss and every gradient equal the single-process model's."""
    _with_ep_pass()
    torch._dynamo.reset()
    counters.clear()
    from hf_models import causal_lm
    ref = causal_lm("qwen3_moe").double().train()
    ref.config.use_cache = False
    ep = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    sharded = set(shard_experts(ep, mesh))
    assert len(sharded) == 2 * ref.config.num_hidden_layers
    for layer in ep.model.layers:
        layer.compile(backend="moec", options={"dense_backend": "aot_eager", "ep_group": mesh})
    ids = torch.randint(3, 96, (2, 4 + rank), generator=torch.Generator().manual_seed(rank))
    expected, got = ref(ids, labels=ids).loss, ep(ids, labels=ids).loss
    expected.backward()
    got.backward()
    assert_close(got, expected)
    for (name, p), q in zip(ref.named_parameters(), ep.parameters()):
        want = summed(p.grad) if name in sharded else p.grad
        assert_close(q.grad.full_tensor() if name in sharded else q.grad, want, msg=name)
    # one backward graph for both layers: its experts' backward split once (schedule_wgrad; how many
    # weight-gradient ops it then moves is the schedule's business, counted as wgrad_ops_moved)
    seen = {key: n for key, n in counters["moec"].items() if key != "wgrad_ops_moved"}
    assert seen == {"graphs": 1, "regions_fused": 1, "experts_backward_split": 1}, dict(counters["moec"])


def test_causal_lm_compiled_per_block_with_dtensor_experts(pool2):
    pool2.run(causal_lm_per_block_matches_single_process, timeout=120)


def compile_with_indivisible_experts(rank, ws):
    _with_ep_pass()
    torch._dynamo.reset()
    from moe_idioms import MaskLoopMoE
    compiled = torch.compile(MaskLoopMoE(hidden=8, ffn=6, experts=3, top_k=2), backend="moec",
                             options={"dense_backend": "eager", "ep_group": "world"})
    with pytest.raises(Exception, match="3 experts cannot be split evenly over an expert-parallel group of 2"):
        compiled(torch.randn(5, 8))


def test_indivisible_experts_fail_at_compile(pool2):
    pool2.run(compile_with_indivisible_experts, timeout=120)


def compiled_different_layers(rank, ws, dense_backend):
    forget()    # this pool's ranks may have agreed on these layers in an earlier test
    _with_ep_pass()
    torch._dynamo.reset()
    from moe_idioms import MaskLoopMoE
    compiled = torch.compile(MaskLoopMoE(hidden=8, ffn=6, experts=4, top_k=2 - rank), backend="moec",
                             options={"dense_backend": dense_backend, "ep_group": "world"})
    with pytest.raises(MoecError, match="compiled different MoE layers:\n  rank 0: .* k=2 .*\n  rank 1: .* k=1 "):
        compiled(torch.randn(5, 8))


@pytest.mark.parametrize("dense_backend", ["aot_eager", "inductor"])
def test_ranks_that_compiled_different_layers_fail_at_first_step(pool2, dense_backend):
    pool2.run(compiled_different_layers, dense_backend, timeout=240)


def test_pass_changes_nothing_without_ep_group():
    def f(x, src, offsets, w_up, w_down):
        return torch.ops.moec.experts(x, src, offsets, 2, [w_up, w_down], "w_up=0 w_down=1", "relu", 0.0, 0.0)
    gm = torch.fx.symbolic_trace(f)
    before = gm.code

    class Ctx:
        config = Config()
    gm, report = expert_parallel(gm, Ctx())
    assert report == ExpertParallelReport("", 1, ()) and gm.code == before
