"""passes/schedule_wgrad.py in a compiled expert-parallel training step on 2 gloo ranks: with the
pass on, the step equals the step with it off and the single-process model (outputs, every
gradient), and the backward runs weight-gradient ops between an all-to-all and its wait."""
import copy
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh
from torch.testing import assert_close


sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))

from moe_ops import summed  # noqa: E402

HF_EXPERTS = {"experts.gate_up_proj", "experts.down_proj"}


def _step(fn, module, x):
    xi = x.clone().requires_grad_()
    out = fn(xi)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    return out.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}


def _matches_reference(got, ref, rank):
    out, gx, grads = got
    assert_close(out, ref[0])
    assert_close(gx, ref[1], msg="grad of x")
    for name, g in ref[2].items():
        want = g.clone()
        if name in HF_EXPERTS:          # each rank's expert grads cover its own tokens only
            dist.all_reduce(want)
            assert_close(summed(grads[name]), want, msg=f"grad of {name} (rank {rank})")
        else:
            assert_close(grads[name], want, msg=f"grad of {name} (rank {rank})")


def _moved_under_all_to_all(code, moved):
    """Each moved node is assigned between the all-to-all whose window it is in and its wait."""
    lines = code.splitlines()
    at = lambda name: next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name} = "))
    for start, wait, nodes in moved:
        for n in nodes:
            assert at(start) < at(n) < at(wait), f"{n} not between {start} and {wait}:\n{code}"


def aot_eager_step_with_and_without_schedule(rank, ws):
    from hf_models import moe_block
    torch.manual_seed(0)
    ref = moe_block("mixtral")
    x = torch.randn(1, 4 + rank, 32, generator=torch.Generator().manual_seed(rank))   # dropless, uneven
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    expected = _step(ref, ref, x)
    results, moved = {}, {}
    runs = {"off": {"wgrad_schedule": False}, "on": {}, "on, 64 MiB": {"wgrad_memory_bound_mb": 64}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs.items():
            torch._dynamo.reset()
            counters.clear()
            model = copy.deepcopy(ref)
            options = {"dense_backend": "aot_eager", "ep_group": mesh, "dump_dir": f"{tmp}/{name}",
                       "cache_dir": f"{tmp}/cache", **extra}     # no calibration there: fixed rates
            results[name] = _step(torch.compile(model, backend="moec", options=options), model, x)
            assert counters["moec"]["experts_backward_split"] == (name != "off"), dict(counters["moec"])
            assert (counters["moec"]["wgrad_ops_moved"] > 0) == (name != "off"), dict(counters["moec"])
            if name != "off":
                moved[name] = _moved_in_dump(tmp, name)
        assert not list(Path(f"{tmp}/off").glob("*/wgrad_schedule*"))
    # within the default bound (no extra memory) the expert weights' gradients move under the
    # dispatch's backward all-to-all, their GEMMs (experts_wgrad) too: they hold h, du, dg past its
    # start, which by the pass's accounting no longer raises the backward's peak since the local
    # experts keep their pre-activations (experts_save) and the rows half frees them (before, it
    # took the 64 MiB bound). The bound itself: tests/passes/test_schedule_wgrad.py
    ops = lambda name: {n.rstrip("_0123456789") for _, _, nodes in moved[name] for n in nodes}
    for name in ("on", "on, 64 MiB"):
        assert {"slice_backward", "experts_wgrad_default"} <= ops(name), moved[name]
    # same kernels in another order: bit for bit the same step
    for name in ("on", "on, 64 MiB"):
        for a, b in zip(results[name][:2], results["off"][:2]):
            assert torch.equal(a, b), name
        for param, g in results["off"][2].items():
            assert torch.equal(results[name][2][param], g), (name, param)
    _matches_reference(results["on"], expected, rank)


def _moved_in_dump(tmp, name):
    """[(all-to-all, wait, moved nodes)] from wgrad_schedule.txt, checked against the dumped
    backward graph: each moved node runs between the all-to-all and its wait."""
    [folder] = Path(f"{tmp}/{name}").iterdir()
    text = (folder / "wgrad_schedule.txt").read_text()
    assert (folder / "wgrad_schedule_0.png").exists()
    windows = re.findall(r"\n(all_to_all_single_\d+) \.\. (wait_tensor_\d+):[^\n]*\n((?:  moved[^\n]*\n)*)", text)
    moved = [(s, w, re.findall(r"(\w+) \(\w+\)", body)) for s, w, body in windows if body]
    assert moved, text
    backward = next(text for text in (f.read_text() for f in sorted(folder.glob("aot_backward*.py")))
                    if "all_to_all_single" in text)
    _moved_under_all_to_all(backward, moved)
    return moved


def test_aot_eager_step_with_and_without_the_schedule_match_single_process(pool2):
    pool2.run(aot_eager_step_with_and_without_schedule, timeout=240)


def inductor_step_runs_weight_gradients_under_the_all_to_alls(rank, ws, capacity_factor):
    import torch._functorch.config as functorch_config
    from hf_models import moe_block
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    ref = moe_block("mixtral")
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(rank))
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    expected = _step(ref, ref, x)
    model = copy.deepcopy(ref)
    # a cache hit would skip the post-grad passes, and the pass's report with them
    no_cache = (torch._inductor.config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False))
    with tempfile.TemporaryDirectory() as tmp, no_cache[0], no_cache[1]:
        compiled = torch.compile(model, backend="moec", options={"ep_group": mesh, "cache_dir": tmp,
                                                                 "ep_capacity_factor": capacity_factor})
        got, codes = run_and_get_code(_step, compiled, model, x)
    _matches_reference(got, expected, rank)
    assert counters["moec"]["wgrad_ops_moved"] > 0, dict(counters["moec"])
    assert counters["moec"]["experts_backward_split"] == 1, dict(counters["moec"])
    [backward] = [c for c in codes if "moec.experts_backward_rows" in c]
    assert "moec.experts_wgrad" in backward
    calls = [line.strip() for line in backward[backward.index("def call("):].splitlines()]
    pos = lambda needle, after=0: next(i for i, line in enumerate(calls) if i > after and needle in line)
    # the combine's backward all-to-all: the router's backward and the gate weight's gradient run
    # under it, then its wait (AOT autograd put them after both all-to-alls)
    start = pos("_c10d_functional.all_to_all_single.default(")
    assert start < pos("moec.route_backward.default(") < pos("extern_kernels.mm(") < \
        pos("_c10d_functional.wait_tensor.default(", start), "\n".join(calls)


@pytest.mark.parametrize("capacity_factor", [0.0, 2.0], ids=["dropless", "capacity"])
def test_inductor_step_runs_weight_gradients_under_the_all_to_alls(pool2, capacity_factor):
    pool2.run(inductor_step_runs_weight_gradients_under_the_all_to_alls, capacity_factor, timeout=300)
