"""Pass `fuse_router` (with MOEC_ROUTER_PLAN=1): the router's linear layer joins route_plan in one
`moec.router_plan`; the logits' other readers read the op's; results and gradients equal the
graph without it. Off (the default), and where the logits are no linear layer's output, nothing
changes, and the report says why."""
import operator

import torch
import torch.nn.functional as F

from moec.codegen import router_plan_op
from moe_idioms import MaskLoopMoE
from test_fuse_routing import _capture, _final_graph, _targets

_OPS = torch.ops.moec


class LogitsOutMoE(MaskLoopMoE):
    """Returns its router's logits too (scaled), as HF's MoE blocks return them for an auxiliary
    loss; that reader comes before the routing in the graph."""

    def forward(self, x):
        logits = self.gate(x)
        scaled = logits * 2.0
        w, ids = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = torch.where(ids == e)
            g, u = F.linear(x[tok], self.gate_up[e]).chunk(2, dim=-1)
            out.index_add_(0, tok, F.linear(F.silu(g) * u, self.down[e]) * w[tok, slot, None])
        return out, scaled


def _grads(gm, inputs):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    outs = gm(*inputs)
    draws = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=draws)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves)


def _fused_against_apart(monkeypatch, model, x):
    captured, inputs = _capture(model, x)
    apart, report = _final_graph(captured, inputs, "fuse_router")
    assert report.off and _OPS.router_plan.default not in _targets(apart)       # off by default
    monkeypatch.setattr(router_plan_op, "ENABLED", True)
    gm, report = _final_graph(captured, inputs, "fuse_router")
    targets = _targets(gm)
    assert len(report.fused) == 1 and targets.count(_OPS.router_plan.default) == 1
    routers = {torch._C._nn.linear, operator.matmul}     # the experts' linear layers are gone after the rewrite
    assert _OPS.route_plan.default not in targets and not routers & set(targets)
    assert routers & set(_targets(apart))
    got, want = _grads(gm, inputs), _grads(apart, inputs)
    assert len(got) >= 4        # x, the router's weight, the experts' two
    for a, b in zip(got, want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_router_linear_and_route_plan_become_one_op(monkeypatch):
    torch.manual_seed(0)
    _fused_against_apart(monkeypatch, MaskLoopMoE(), torch.randn(10, 32, requires_grad=True))


def test_logits_read_elsewhere_read_the_ops(monkeypatch):
    """The returned logits' gradient reaches the router's weight beside the routing weights'."""
    torch.manual_seed(0)
    _fused_against_apart(monkeypatch, LogitsOutMoE(), torch.randn(9, 32, requires_grad=True))


def test_a_router_written_x_at_w_transposed_too(monkeypatch):
    torch.manual_seed(0)
    _fused_against_apart(monkeypatch, MaskLoopMoE(router="matmul_t"), torch.randn(7, 32, requires_grad=True))


def test_logits_of_an_einsum_stay_apart_with_the_reason(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(router_plan_op, "ENABLED", True)
    gm, report = _final_graph(*_capture(MaskLoopMoE(router="einsum"), torch.randn(8, 32)), "fuse_router")
    [(_, why)] = report.kept
    assert "not a linear layer's output" in why and report.fused == ()
    assert _OPS.route_plan.default in _targets(gm) and any("kept apart" in line for line in report.log_lines())
