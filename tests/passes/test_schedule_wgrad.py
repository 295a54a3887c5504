"""passes/schedule_wgrad.py on small hand-built backward graphs (make_fx on fake tensors, so the
functional collectives need no process group): valid orders, weight gradients between an
all-to-all and its wait, nothing moved without slack, the memory bound kept."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from moec.passes.node_costs import ALL_TO_ALL, WAIT, NodeCosts
from moec.passes.schedule_wgrad import schedule_wgrad, weight_gradient_nodes
from moec.runtime import AllToAllModel, ComputeModel

a2a = torch.ops._c10d_functional.all_to_all_single
wait = torch.ops._c10d_functional.wait_tensor

# 1 GFLOP/s, 1 GB/s, no launch: an (m, k) x (k, n) GEMM of these sizes takes microseconds
COMPUTE = ComputeModel(1e9, 1e9, 0.0)


def costs(latency_s=1e-3, bandwidth=1e12):
    return NodeCosts(COMPUTE, AllToAllModel(latency_s, bandwidth, world_size=2), rank=0, world_size=2, source="test")


def trace(fn, *shapes):
    return make_fx(fn, tracing_mode="fake")(*[torch.randn(*s) for s in shapes])


def linear_backward(g, x, w, h):
    """A layer's backward: dW1 = g^T x could run any time (AOT put it first), the input gradient
    goes through an all-to-all, dW2 needs its result, db could run before it."""
    dw1 = g.t() @ x
    got = wait(a2a(g @ w, [8, 8], [8, 8], "0"))
    dx = got @ w.t()
    dw2 = got.t() @ h
    db = g.sum(0)
    return dx, dw1, dw2, db


LINEAR = ((16, 32), (16, 32), (32, 32), (16, 32))
PARAMS = (1, 2, 3)    # dw1, dw2, db are parameter gradients; dx is not


def names(gm):
    return [n.name for n in gm.graph.nodes]


def check_valid(gm, before):
    """Same nodes, each after its inputs, collectives in their old relative order."""
    order = names(gm)
    assert sorted(order) == sorted(before)
    seen = set()
    for n in gm.graph.nodes:
        assert all(i.name in seen for i in n.all_input_nodes), f"{n.name} runs before an input"
        seen.add(n.name)
    comm = lambda seq: [x for x in seq if x.startswith(("all_to_all_single", "wait_tensor"))]
    assert comm(order) == comm(before)
    gm.graph.lint()


def window(gm):
    nodes = list(gm.graph.nodes)
    start = next(i for i, n in enumerate(nodes) if n.target is ALL_TO_ALL)
    end = next(i for i, n in enumerate(nodes) if n.target is WAIT)
    return [n.name for n in nodes[start + 1:end]]


def test_weight_gradient_nodes_are_those_feeding_only_parameter_gradients():
    gm = trace(linear_backward, *LINEAR)
    found = {n.name for n in weight_gradient_nodes(gm.graph, PARAMS)}
    # t(g), mm -> dw1; t(got), mm -> dw2; sum -> db. g @ w feeds the all-to-all, got @ w^T is dx.
    assert found == {"t", "mm", "t_2", "mm_3", "sum_1"}, found
    assert {n.name for n in weight_gradient_nodes(gm.graph, ())} == set()
    # an op whose result is both a parameter's and an input's gradient is not a weight gradient
    both = trace(lambda g, x: ((g.t() @ x),) * 2, (4, 8), (4, 8))
    assert weight_gradient_nodes(both.graph, (0,)) == set()


def test_ready_weight_gradients_run_between_the_all_to_all_and_its_wait():
    gm = trace(linear_backward, *LINEAR)
    before = names(gm)
    gm, report = schedule_wgrad(gm, PARAMS, costs())
    check_valid(gm, before)
    # dW1's GEMM deferred from before the all-to-all (its view t(g) stays, it costs nothing), db
    # advanced from after the wait; dW2 needs the wait
    assert set(window(gm)) == {"mm", "sum_1"}, gm.code
    [w] = report.windows
    assert {m.direction for m in w.moves} == {"later", "earlier"}
    assert w.hidden_after_s > w.hidden_before_s == 0
    assert report.step_after_s < report.step_before_s
    assert [why for nodes, why in report.left if "mm_3" in nodes] == \
        ["needs wait_tensor, which depends on an all-to-all that has not finished there"]
    assert report.peak_after <= report.peak_before
    assert {e.label for e in report.timeline_after if e.moved} == {"mm", "sum_1"}     # what the picture hatches
    assert not any(e.moved for e in report.timeline_before)


def test_backward_picture(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the dump extra) is not installed")
    from moec.draw_schedule import _as_schedule, draw_backward
    _, report = schedule_wgrad(trace(linear_backward, *LINEAR), PARAMS, costs())
    draw_backward(report, tmp_path / "b.png", title="test")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = _as_schedule(report.timeline_after, report.step_after_s, 0.0)
    assert sorted(e.label for e in after.events if e.stage == "wgrad") == ["mm", "sum_1"]
    assert [e.label for e in after.events if e.stream == "comm"] == ["all_to_all_single"]


def test_largest_unit_that_fits_goes_first_and_the_rest_stays_when_the_time_is_used_up():
    gm = trace(linear_backward, *LINEAR)
    c = costs()
    mm = next(n for n in gm.graph.nodes if n.name == "mm")
    # room for dW1's GEMM alone (it is larger than db's sum): db stays after the wait
    c.a2a = AllToAllModel(c.compute_s(mm) * 1.01, 1e12, world_size=2)
    gm, report = schedule_wgrad(gm, PARAMS, c)
    assert window(gm) == ["mm"]
    assert any("sum_1" in nodes and "does not fit the" in why for nodes, why in report.left), report.left


def test_nothing_moves_without_slack():
    gm = trace(linear_backward, *LINEAR)
    before = gm.code
    gm, report = schedule_wgrad(gm, PARAMS, costs(latency_s=1e-9))
    assert gm.code == before and report.moved == 0
    assert window(gm) == []
    assert report.step_after_s == report.step_before_s


def test_nothing_moves_where_compute_already_fills_the_all_to_all():
    def busy(g, x, w, h):
        sent = a2a(g, [8, 8], [8, 8], "0")
        filler = (x @ w) @ w                 # already under the all-to-all, longer than it
        got = wait(sent)
        return got @ w + filler, g.t() @ h
    gm = trace(busy, (16, 32), (16, 32), (32, 32), (16, 32))
    before = gm.code
    c = costs()
    c.a2a = AllToAllModel(1e-6, 1e12, world_size=2)
    gm, report = schedule_wgrad(gm, (1,), c)
    assert gm.code == before and report.moved == 0
    [w] = report.windows
    assert w.busy_s > w.comm_s


def test_ancestors_on_no_wait_are_pulled_along():
    """A router-like input gradient r feeds both the all-to-all's consumer and a weight gradient;
    r ran after the wait: it moves along, before the weight gradient."""
    def router(g, x, s, w):
        got = wait(a2a(g, [8, 8], [8, 8], "0"))
        r = s * 2.0                          # (16, 4): depends on no all-to-all
        dx = got @ w + r @ w[:4]
        dw = r.t() @ x                       # the gate weight's gradient
        return dx, dw
    gm = trace(router, (16, 32), (16, 32), (16, 4), (32, 32))
    before = names(gm)
    gm, report = schedule_wgrad(gm, (1,), costs())
    check_valid(gm, before)
    [move] = report.windows[0].moves
    assert move.nodes == ("mul", "t", "mm_2") and move.direction == "earlier", gm.code
    assert window(gm) == ["mul", "t", "mm_2"]


def test_memory_bound_keeps_a_move_that_would_hold_a_large_input():
    """Deferring dW = x^T g past a large allocation keeps x (its last use) alive across it."""
    def held(g, x, w):
        dw = x.t() @ g                        # x (256, 256) is read last here
        got = wait(a2a(g @ w, [128, 128], [128, 128], "0"))
        big = got.repeat(4, 1)                # (1024, 64): allocated while dw's inputs would be held
        return big.sum(0), dw
    shapes = ((256, 64), (256, 256), (64, 64))
    c = costs(latency_s=1.0)
    gm, tight = schedule_wgrad(trace(held, *shapes), (1,), c, memory_bound_bytes=0)
    assert tight.moved == 0
    assert any("peak memory" in why for _, why in tight.left), tight.left
    gm, loose = schedule_wgrad(trace(held, *shapes), (1,), c, memory_bound_bytes=1 << 20)
    assert loose.moved > 0 and "mm" in window(gm)
    assert tight.peak_before < loose.peak_after <= loose.peak_before + (1 << 20)


def test_each_all_to_all_is_filled_in_program_order():
    def two(g, x, w, h):
        first = wait(a2a(g, [8, 8], [8, 8], "0"))
        mid = first @ w
        second = wait(a2a(mid, [8, 8], [8, 8], "0"))
        return second @ w, g.t() @ x, mid.t() @ h     # dW1 ready at once, dW2 after the first wait
    gm = trace(two, (16, 32), (16, 32), (32, 32), (16, 32))
    before = names(gm)
    gm, report = schedule_wgrad(gm, (1, 2), costs(), memory_bound_bytes=1 << 20)
    check_valid(gm, before)
    first, second = report.windows
    # dW1 is ready at once: the first all-to-all takes it; dW2 reads the first one's result
    assert [m.nodes for m in first.moves] == [("t", "mm_2")]
    assert [m.nodes for m in second.moves] == [("t_1", "mm_3")]
    # with no memory to spare dW2 stays: its (32, 32) result would be live across the second wait
    _, strict = schedule_wgrad(trace(two, (16, 32), (16, 32), (32, 32), (16, 32)), (1, 2), costs())
    assert [len(w.moves) for w in strict.windows] == [1, 0]


def test_no_all_to_all_no_change():
    gm = trace(lambda g, x: (g @ x.t(), g.t() @ x), (4, 8), (4, 8))
    before = gm.code
    gm, report = schedule_wgrad(gm, (1,), costs())
    assert gm.code == before and report.skipped == "no all-to-all in this graph"


@pytest.mark.parametrize("bound", [0, 1 << 30])
def test_report_text_names_each_all_to_all_and_move(bound):
    gm, report = schedule_wgrad(trace(linear_backward, *LINEAR), PARAMS, costs(), bound)
    text = report.text()
    assert "all_to_all_single .. wait_tensor" in text and "moved later" in text and "mm (mm)" in text
    assert report.summary().startswith("schedule_wgrad: 2 weight-gradient ops moved under 1 of 1 all-to-alls")
