"""passes/chunk_costs.py's op times from shapes: a batched matmul and attention are priced by their
FLOPs (not as elementwise ops), so the choice between cutting tokens and cutting whole sequences
sees what the attention costs."""
import pytest
import torch
import torch.nn.functional as F

from fx_values import traced
from moec.passes.chunk_costs import node_op
from moec.passes.graph import op_name
from moec.runtime.cost_model import ComputeModel

B, h, S, d = 2, 3, 8, 4
FLOPS = ComputeModel(1e9, 1e30, 0.0)       # time = flops / 1e9: bytes and launches free


def _op(fn, name, kind, *inputs):
    gm = traced(fn, *inputs)
    node = next(n for n in gm.graph.nodes if op_name(n) == name)
    return node_op(node, kind, FLOPS)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_priced_by_its_flops(causal):
    q = torch.randn(B, h, S, d)
    op = _op(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=causal), "scaled_dot_product_attention",
             "attention", q)
    want = 4 * B * h * S * S * d / (2 if causal else 1)
    assert op.time_s == pytest.approx(want / 1e9)
    assert op.chunk_s(2) == pytest.approx(want / 2e9)          # each of 2 chunks of sequences: half


def test_batched_matmul_is_priced_by_its_flops():
    a, b = torch.randn(B, S, d), torch.randn(B, d, S)
    op = _op(lambda a, b: a @ b, "matmul", "batched", a, b)
    assert op.time_s == pytest.approx(2 * B * S * S * d / 1e9)
