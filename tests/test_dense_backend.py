"""`dense_backend`: the graph outside the MoE regions goes to any torch.compile backend; moec's
ops stay outside what non-Inductor backends see. Inference saves nothing for backward."""
import importlib.util

import pytest
import torch
from torch._dynamo.utils import counters

import moec
from compare import check_compiled_matches_eager
from e2e.hf_models import causal_lm


def _model():
    return causal_lm("qwen3_moe", "grouped_mm")


def _tokens():
    return torch.randint(3, 96, (2, 7))


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_registered_backends(backend):
    check_compiled_matches_eager(_model(), _tokens(), dense_backend=backend)
    assert counters["moec"]["regions_fused"] == 2


def test_user_callable_sees_only_dense_partitions():
    graphs = []

    def recorder(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    check_compiled_matches_eager(_model(), _tokens(), dense_backend=recorder)
    assert counters["moec"]["regions_fused"] == 2
    assert len(graphs) >= 3       # dense code before, between and after the two MoE layers
    seen = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert not [t for t in seen if t.startswith("moec.")], seen


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(Exception, match="dense_backend='nope' is not a torch.compile backend"):
        torch.compile(_model(), backend="moec", options={"dense_backend": "nope"})(_tokens())


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None,
                    reason="torch-tensorrt is installed here: the missing-package error cannot arise")
@pytest.mark.parametrize("name", ["torch_tensorrt", "tensorrt"])
def test_tensorrt_missing_names_the_extra(name):
    with pytest.raises(Exception, match=r"needs torch-tensorrt.*pip install moec\[tensorrt\]"):
        torch.compile(_model(), backend="moec", options={"dense_backend": name})(_tokens())


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs torch-tensorrt (from NVIDIA's package index) and a GPU")
def test_tensorrt_dense_partitions():
    model, tokens = _model().cuda().half(), _tokens().cuda()
    with torch.no_grad():
        out = torch.compile(model, backend="moec", options={"dense_backend": "torch_tensorrt"})(tokens)
        torch.testing.assert_close(out.logits, model(tokens).logits, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_inference_saves_nothing_for_backward(context):
    model = _model()
    compiled = torch.compile(model, backend="moec", options={"dense_backend": "eager"})
    saved = []
    tokens = _tokens()
    with context(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = compiled(tokens).logits
        ref = model(tokens).logits
    assert not saved and out.grad_fn is None
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-5)
    assert counters["moec"]["regions_fused"] == 2
