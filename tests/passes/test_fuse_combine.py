"""Pass `fuse_combine`: experts + combine become one `moec.experts_combine` where the layer runs on
one device; it keeps the pre-activations only when the traced output needs a gradient."""
import torch

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.capture import dynamic_capture
from moec.config import Config
from moec.pipeline import run_pipeline
from moe_idioms import MaskLoopMoE

_FUSED = torch.ops.moec.experts_combine.default


def _final_graph(model, x, grad, **options):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm
    torch._dynamo.reset()
    with dynamic_capture(), torch.set_grad_enabled(grad):
        torch.compile(model, backend=backend)(x)
        [(gm, inputs)] = graphs
        ref = gm(*inputs)
        gm, reports = run_pipeline(gm, inputs, Config(dense_backend="eager", **options))[:2]
        out = gm(*inputs)
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-5)
    return gm, reports["fuse_combine"] if "fuse_combine" in reports else None


def _fused(gm):
    return [n for n in gm.graph.nodes if n.target is _FUSED]


def test_training_graph_keeps_the_preactivations():
    torch.manual_seed(0)
    gm, report = _final_graph(MaskLoopMoE(), torch.randn(10, 32), grad=True)
    [node] = _fused(gm)
    assert node.args[-1] is True and report.fused == ((report.fused[0][0], True),)
    assert not [n for n in gm.graph.nodes if n.target in (torch.ops.moec.experts.default,
                                                          torch.ops.moec.combine.default)]


def test_inference_graph_keeps_nothing():
    torch.manual_seed(0)
    gm, report = _final_graph(MaskLoopMoE(), torch.randn(10, 32), grad=False)
    [node] = _fused(gm)
    assert node.args[-1] is False
    assert "keeping nothing" in report.log_lines()[0]


def test_disabled_keeps_the_two_ops():
    torch.manual_seed(0)
    gm, report = _final_graph(MaskLoopMoE(), torch.randn(10, 32), grad=True, disable=("fuse_combine",))
    assert report is None and not _fused(gm)
    assert [n.target for n in gm.graph.nodes].count(torch.ops.moec.combine.default) == 1
