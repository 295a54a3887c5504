"""Pass `fuse_routing`: route + plan become one `moec.route_plan` where the plan reads the router's
ids directly; a capacity layer's plan (fed the kept ids) stays apart. Results and gradients equal."""
import copy

import torch

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.capture import dynamic_capture
from moec.config import Config
from moec.pipeline import run_pipeline
from moe_idioms import CapacityTop2MoE, MaskLoopMoE

_OPS = torch.ops.moec


def _capture(model, x):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm
    torch._dynamo.reset()
    with dynamic_capture():
        torch.compile(model, backend=backend)(x)
    [(gm, inputs)] = graphs
    return gm, inputs


def _final_graph(gm, inputs, report="fuse_routing", **options):
    """The pipeline's graph, its outputs checked against the captured graph's, and the report of pass `report`."""
    ref = gm(*inputs)
    gm, reports = run_pipeline(copy.deepcopy(gm), inputs, Config(dense_backend="eager", **options))[:2]
    for a, b in zip(gm(*inputs), ref):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)
    return gm, reports.get(report)


def _targets(gm):
    return [n.target for n in gm.graph.nodes]


def test_route_and_plan_become_one_op_with_the_same_gradients():
    torch.manual_seed(0)
    captured, inputs = _capture(MaskLoopMoE(), torch.randn(10, 32, requires_grad=True))
    gm, report = _final_graph(captured, inputs)
    targets = _targets(gm)
    assert targets.count(_OPS.route_plan.default) == 1 and len(report.fused) == 1
    assert _OPS.route.default not in targets and _OPS.plan.default not in targets
    apart, _ = _final_graph(captured, inputs, disable=("fuse_routing",))
    assert _OPS.route.default in _targets(apart) and _OPS.plan.default in _targets(apart)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    assert leaves
    grads = [torch.autograd.grad(g(*inputs)[0].square().sum(), leaves) for g in (gm, apart)]
    assert all(g.abs().sum() > 0 for g in grads[0])      # the router's weight too: through the routing weights
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_capacity_plan_stays_apart():
    torch.manual_seed(0)
    gm, report = _final_graph(*_capture(CapacityTop2MoE(), torch.randn(12, 32)))
    assert report.fused == () and _OPS.route_plan.default not in _targets(gm)
    assert _OPS.plan.default in _targets(gm)
