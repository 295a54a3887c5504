"""experts_combine's backward as three ops (experts_combine_op._backward): the first reads the saved
pre-activations and makes dx, the routing weights' gradient, w h, du and dg; the second the gate/up
weight gradients from du, dg (moec.experts_wgrad); the third the down projection's from w h. In a
traced backward pre's last reader is the first op, so a compiled backward frees it before any
weight gradient, where the step's memory peaks. Values and gradients against float64 on both
backends (the reference backend runs the ops' reference twins); LoRA, a base both sides read and a
frozen down projection keep one op."""
import pytest
import torch
from functorch.compile import aot_function, make_boxed_func

from moec.codegen import experts_combine_op, kernels, reference, tuning
from moec.codegen import layout as layouts
from moec.codegen.errors import MoecKernelError

from kernel_helpers import DEVICE, TOL, assert_grads_close, padded, rel_err
from test_experts_combine import KERNELS
from test_experts_launch import SMALL, _layer, _routing
import test_lora_experts

OPS = torch.ops.moec


def _case(T, E, k, H, F, dtype, bias, layout, how="uniform"):
    x = padded((T, H), dtype).requires_grad_()
    offsets, src, inv = _routing(T, E, k, how)
    route_w = torch.rand(T, k, device=DEVICE).to(dtype).requires_grad_()
    bases, layout = _layer(E, H, F, dtype, True, bias, layout)
    for w in bases:
        w.requires_grad_()
    return x, offsets, src, inv, route_w, bases, layout


def _backward_graph(x, offsets, src, inv, route_w, bases, layout, k):
    graphs = []

    def bw(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def layer(x, route_w, src, offsets, inv, *bases):
        return OPS.experts_combine(x, src, offsets, inv, route_w, k, list(bases), layout, "silu", 0.0, 0.0, True)[0]
    compiled = aot_function(layer, fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=bw)
    with tuning.pin(**{name: SMALL for name in KERNELS}):
        out = compiled(x, route_w, src, offsets, inv, *bases)
        out.backward(torch.randn_like(out))
    return graphs[0].graph


def _calls(graph):
    return [n for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("moec.")]


@pytest.mark.parametrize("layout,bias", [("interleaved", False), ("transposed", True)])
def test_pre_is_last_read_before_the_down_weight_gradient(layout, bias):
    k = 2
    x, offsets, src, inv, route_w, bases, layout = _case(11, 4, k, 24, 16, torch.float32, bias, layout)
    graph = _backward_graph(x, offsets, src, inv, route_w, bases, layout, k)
    rows, up, down = _calls(graph)
    assert [str(n.target) for n in (rows, up, down)] == ["moec.experts_combine_backward_rows.default",
                                                         "moec.experts_wgrad.default",
                                                         "moec.experts_down_wgrad.default"]
    pre = [n for n in graph.nodes if n.op == "placeholder" and n.meta["val"].shape == (11 * k, 32)]
    assert len(pre) == 1 and set(pre[0].users) == {rows}
    assert not any(pre[0] in n.all_input_nodes for n in graph.nodes if n is not rows)


def test_a_frozen_gate_up_skips_its_weight_gradient_op():
    k = 2
    x, offsets, src, inv, route_w, bases, layout = _case(7, 3, k, 24, 16, torch.float32, False, "interleaved")
    bases[0].requires_grad_(False)
    graph = _backward_graph(x, offsets, src, inv, route_w, bases, layout, k)
    assert [str(n.target) for n in _calls(graph)] == ["moec.experts_combine_backward_rows.default",
                                                      "moec.experts_down_wgrad.default"]


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("triton", torch.bfloat16),
                                           ("reference", torch.float32)])
@pytest.mark.parametrize("how,bias", [("uniform", True), ("sparse", False), ("one_expert", True)])
def test_two_ops_against_float64(backend, dtype, how, bias):
    k = 2
    x, offsets, src, inv, route_w, bases, layout = _case(13, 5, k, 24, 40, dtype, bias, "interleaved", how)
    with kernels.backend(backend), tuning.pin(**{name: SMALL for name in KERNELS}):
        out, _ = OPS.experts_combine(x, src, offsets, inv, route_w, k, bases, layout, "silu", 0.0, 0.0, True)
        gout = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, route_w] + bases, gout)
    d = lambda t: t.detach().cpu().double()      # noqa: E731
    routing = (src.cpu(), offsets.cpu(), inv.cpu(), d(route_w), k)
    want = reference.experts_combine_backward(d(gout), d(x), *routing, [d(w) for w in bases], layout, "silu", 0.0,
                                              0.0)
    assert layouts.split_phases(bases, layout, [True] * len(bases)) is not None
    assert_grads_close([g.cpu() for g in grads], want, TOL[dtype] if backend == "triton" else 1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rows_of_the_first_op(backend):
    """The first op's w h, du and dg against float64: the activation of the reference's pre times
    the weights, and the activation's backward of the weighted down-projection gradient."""
    k, F = 2, 16
    x, offsets, src, inv, route_w, bases, layout = _case(9, 3, k, 24, F, torch.float32, True, "transposed")
    gout = torch.randn(9, 24, device=DEVICE)
    with kernels.backend(backend), tuning.pin(**{name: SMALL for name in KERNELS}):
        got = OPS.experts_combine_backward_rows(gout, x, src, offsets, inv, route_w, x.new_empty(0), k, bases,
                                                layout, "silu", 0.0, 0.0)
    d = lambda t: t.detach().cpu().double()      # noqa: E731
    w = [d(b) for b in bases]
    pre = torch.zeros(9 * k, 2 * F, dtype=torch.float64)
    y = reference.experts(d(x), src.cpu(), offsets.cpu(), k, w, layout, "silu", 0.0, 0.0, pre)
    u, g = pre[:, :F], pre[:, F:]
    route = d(route_w).reshape(-1)[src.cpu()].unsqueeze(1)
    grad_y = reference.combine_backward(d(gout), y, inv.cpu(), d(route_w))[0]
    w_down = layouts.views(w, layout)[2]
    dh = torch.zeros(9 * k, F, dtype=torch.float64)
    for e in range(3):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        dh[lo:hi] = grad_y[lo:hi] @ w_down[e]
    dg, du = reference.activate_backward(g, u, dh, "silu", 0.0, 0.0)
    want = {"hw": reference.activate(g, u, "silu", 0.0, 0.0) * route, "du": du, "dg": dg}
    kept = int(offsets[-1])
    for name, t in zip(("hw", "du", "dg"), got[2:]):
        assert t.shape == (9 * k, F) and rel_err(t[:kept].cpu(), want[name][:kept]) < TOL[torch.float32], name


def test_one_op_where_the_backward_cannot_split():
    k = 2
    x, offsets, src, inv, route_w, bases, layout = _case(7, 3, k, 24, 16, torch.float32, False, "interleaved")
    assert layouts.split_phases(bases, layout, [True, False]) is None        # down frozen: nothing to split off
    assert layouts.split_phases(bases, layout, [False, True]) == ([False, True], [False, False])
    p = test_lora_experts._params("interleaved", ("down",), False, torch.float32)
    weights, lora_layout = test_lora_experts._pack("interleaved", p, merged=False)
    assert layouts.split_phases(weights, lora_layout, [True] * len(weights)) is None
    with pytest.raises(MoecKernelError, match="LoRA factors"):
        OPS.experts_combine_backward_rows(torch.randn(7, 24), x, src, offsets, inv, route_w, x.new_empty(0), k,
                                          weights, lora_layout, "silu", 0.0, 0.0)
    bases[1].requires_grad_(False)
    graph = _backward_graph(x, offsets, src, inv, route_w, bases, layout, k)
    assert [str(n.target) for n in _calls(graph)] == ["moec.experts_combine_backward.default"]


def test_split_switch_off_keeps_one_op(monkeypatch):
    """SPLIT_BACKWARD = False (benchmarks/backward_ab.py's other side): the one op."""
    k = 2
    x, offsets, src, inv, route_w, bases, layout = _case(7, 3, k, 24, 16, torch.float32, True, "transposed")
    monkeypatch.setattr(experts_combine_op, "SPLIT_BACKWARD", False)
    graph = _backward_graph(x, offsets, src, inv, route_w, bases, layout, k)
    assert [str(n.target) for n in _calls(graph)] == ["moec.experts_combine_backward.default"]
