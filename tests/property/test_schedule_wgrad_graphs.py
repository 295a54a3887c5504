"""passes/schedule_wgrad.py on random backward-like graphs: a gradient chain through 1-3
all-to-alls, weight gradients (GEMMs, sums) hanging off random points of it, router-like
side branches feeding both, random all-to-all times and memory bounds. After the pass: the
same nodes in a valid order, collectives in their old order, every moved op between its
all-to-all and the wait, no window filled past its slack, the peak within the bound, and the
graph (all-to-alls run as copies) computes exactly what it computed before."""

import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from budget import examples
from moec.passes.node_costs import ALL_TO_ALL, WAIT, NodeCosts
from moec.passes.schedule_wgrad import schedule_wgrad
from moec.runtime import AllToAllModel, ComputeModel
T, H = 16, 32
a2a = torch.ops._c10d_functional.all_to_all_single
wait = torch.ops._c10d_functional.wait_tensor
specs = st.fixed_dictionaries({
    "stages": st.integers(1, 3),
    # weight gradients: (attach point, kind); points are the chain's values, 2 per stage + 1
    "wgrads": st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["mm", "sum", "scaled_mm"])), max_size=5),
    "sides": st.lists(st.integers(0, 6), max_size=2),      # router-like: feeds dx and a weight gradient
    "latency_s": st.sampled_from([1e-8, 1e-6, 1e-5, 1e-3]),
    "bound": st.sampled_from([0, 1 << 12, 1 << 30]),
    "early": st.booleans(),
})

def program(spec):
    """early: each weight gradient is computed as soon as its point exists (AOT's order for the
    ops after a layer), else all at the end (its order for a layer's own weights)."""
    def f(g, w, x, s):
        points, wgrads = [], []

        def point(p):
            points.append(p)
            if spec["early"]:
                wgrads.extend(weight_grad(p, kind) for at, kind in spec["wgrads"] if at % n_points == len(points) - 1)
            return p

        def weight_grad(p, kind):
            return p.sum(0) if kind == "sum" else (p.t() @ x) * (2.0 if kind == "scaled_mm" else 1.0)
        n_points = 2 * spec["stages"] + 1
        g = point(g)
        for _ in range(spec["stages"]):
            g = point(torch.tanh(g @ w))
            g = point(wait(a2a(g, [T // 2, T // 2], [T // 2, T // 2], "0")))
        dx = g
        for at in spec["sides"]:
            r = points[at % n_points][:, :4] * s               # (T, 4)
            dx = dx + r @ w[:4]
            wgrads.append(r.t() @ x)
        if not spec["early"]:
            wgrads.extend(weight_grad(points[at % n_points], kind) for at, kind in spec["wgrads"])
        return (dx, *wgrads)
    inputs = (torch.randn(T, H), torch.randn(H, H) / H ** 0.5, torch.randn(T, H), torch.randn(T, 4))
    return f, inputs


def trace(spec):
    f, inputs = program(spec)
    return make_fx(f, tracing_mode="fake")(*inputs), inputs

class _Local(fx.Interpreter):
    """Runs the graph in one process: an all-to-all is a copy, its wait the identity."""

    def call_function(self, target, args, kwargs):
        if target is ALL_TO_ALL:
            return args[0].clone()
        if target is WAIT:
            return args[0]
        return super().call_function(target, args, kwargs)

@settings(max_examples=examples(60))
@given(spec=specs)
def test_random_backward_graphs_stay_valid_and_compute_the_same(spec):
    gm, inputs = trace(spec)
    reference, _ = trace(spec)
    before = [n.name for n in gm.graph.nodes]
    targets = {n.name: (n.target, str(n.args)) for n in gm.graph.nodes}
    costs = NodeCosts(ComputeModel(1e10, 1e10, 1e-7), AllToAllModel(spec["latency_s"], 1e10, world_size=2), 0, 2)
    n_out = 1 + len(spec["sides"]) + len(spec["wgrads"])
    gm, report = schedule_wgrad(gm, range(1, n_out), costs, spec["bound"])
    order = list(gm.graph.nodes)
    names = [n.name for n in order]
    assert sorted(names) == sorted(before)
    assert {n.name: (n.target, str(n.args)) for n in order} == targets
    pos = {n: i for i, n in enumerate(order)}
    assert all(pos[i] < pos[n] for n in order for i in n.all_input_nodes)
    comm = lambda seq: [x for x in seq if x.startswith(("all_to_all_single", "wait_tensor"))]
    assert comm(names) == comm(before)
    by_name = {n.name: n for n in order}
    for w in report.windows:
        start, end = pos[by_name[w.collective]], pos[by_name[w.wait]]
        assert all(start < pos[by_name[n]] < end for m in w.moves for n in m.nodes)
        assert sum(m.time_s for m in w.moves) <= w.comm_s - w.busy_s + 1e-12
        assert w.hidden_after_s >= w.hidden_before_s - 1e-12
    assert report.peak_after <= report.peak_before + spec["bound"]
    assert report.step_after_s <= report.step_before_s + 1e-12

    got, want = _Local(gm).run(*inputs), _Local(reference).run(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))

def test_some_random_graph_moves_something():
    """The property above is not vacuous: a graph it draws from does move weight gradients."""
    spec = {"stages": 2, "wgrads": [(1, "mm"), (2, "sum")], "sides": [1], "latency_s": 1e-3, "bound": 0,
            "early": True}
    gm, _ = trace(spec)
    costs = NodeCosts(ComputeModel(1e10, 1e10, 1e-7), AllToAllModel(1e-3, 1e10, world_size=2), 0, 2)
    _, report = schedule_wgrad(gm, range(1, 4), costs, 0)
    assert report.moved > 0 and {m.direction for w in report.windows for m in w.moves} == {"later", "earlier"}

