"""runtime/schedule_search.py: the search finds what brute force over every chunk count and every
contiguous range finds (timed by an independent two-stream simulator written here), k=1 is the
serial sum, compute-bound layers hide all communication, and weight gradients go into idle time
within the memory budget."""
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moec.codegen.errors import MoecError
from moec.runtime import AllToAllModel, LayerCosts, Op, WGrad, predict, search

MS = 1e-3


def a2a_model(latency_s=20e-6, bw=50e9, world=8):
    return AllToAllModel(latency_s, bw, world_size=world)


def reference_time(costs, a2a, k, pre_range, post_range):
    """Two in-order streams over an explicit task DAG: (stream, duration, deps) in program order."""
    tasks = []

    def add(stream, dur, deps=()):
        tasks.append((stream, dur, list(deps)))
        return len(tasks) - 1

    d = a2a.time(costs.dispatch_bytes, k)
    c = a2a.time(costs.combine_bytes, k)
    (lo, hi), n = pre_range, len(costs.pre)
    last = None
    for op in costs.pre[:lo]:
        last = add("compute", op.time_s)
    ends = []
    for i in range(k):
        for op in costs.pre[lo:hi]:
            last = add("compute", op.chunk_s(k))
        ends.append(last)
    for op in costs.pre[hi:]:
        last = add("compute", op.time_s)
    feeds = ends if (hi == n and lo < hi) else [last] * k
    disp = [add("comm", d, [f] if f is not None else []) for f in feeds]
    exps = [add("compute", costs.experts.chunk_s(k), [disp[i]]) for i in range(k)]
    combs = [add("comm", c, [exps[i]]) for i in range(k)]
    lo, hi = post_range
    for op in costs.post[:lo]:
        add("compute", op.time_s, [combs[-1]])
    for i in range(k):
        for op in costs.post[lo:hi]:
            add("compute", op.chunk_s(k), [combs[i] if lo == 0 else combs[-1]])
    for op in costs.post[hi:]:
        add("compute", op.time_s, [combs[-1]])
    end, free = [0.0] * len(tasks), {"compute": 0.0, "comm": 0.0}
    for t, (stream, dur, deps) in enumerate(tasks):
        start = max([free[stream]] + [end[j] for j in deps])
        end[t] = free[stream] = start + dur
    return max(end)


def all_ranges(ops):
    return [(lo, hi) for lo in range(len(ops) + 1) for hi in range(lo, len(ops) + 1)
            if all(op.splittable for op in ops[lo:hi])]


op_st = st.builds(lambda name, t, split, frac, table: Op(name, t * MS, split, fixed_s=frac * t * MS,
                                                         chunk_times=tuple(x * t * MS for x in table)),
                  st.sampled_from("abcdefgh"), st.floats(0.0, 2.0), st.booleans(), st.floats(0.0, 0.5),
                  st.lists(st.floats(0.05, 1.2), max_size=3).map(lambda xs: (1.0, *xs)))
instance = st.tuples(st.lists(op_st, max_size=3), st.floats(0, 4e7), op_st.map(lambda o: Op("experts", o.time_s,
                     True, o.fixed_s, o.chunk_times)), st.floats(0, 4e7), st.lists(op_st, max_size=3),
                     st.floats(0, 200e-6), st.floats(1e9, 1e11), st.integers(1, 5))


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(instance, st.data())
def test_predict_matches_reference_on_any_ranges(inst, data):
    pre, db, experts, cb, post, lat, bw, k = inst
    costs, a2a = LayerCosts(pre, db, experts, cb, post), a2a_model(lat, bw)
    pr, po = data.draw(st.sampled_from(all_ranges(pre))), data.draw(st.sampled_from(all_ranges(post)))
    assert predict(costs, a2a, k, pr, po).step_s == pytest.approx(reference_time(costs, a2a, k, pr, po),
                                                                  rel=1e-9, abs=1e-15)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(instance)
# an all-to-all shorter than the picture's float-noise threshold (1e-12 s) was left out of the
# exposed total (found by CI's hypothesis 6.170)
@example(([], 0.0, Op("experts", 0.0, True, fixed_s=0.0, chunk_times=(0.0,)), 0.00013737088206747873, [], 0.0,
          1e9, 1))
def test_search_matches_brute_force(inst):
    pre, db, experts, cb, post, lat, bw, k_max = inst
    costs, a2a = LayerCosts(pre, db, experts, cb, post), a2a_model(lat, bw)
    brute = min(reference_time(costs, a2a, k, pr, po) for k in range(1, k_max + 1)
                for pr in (all_ranges(pre) if k > 1 else [(0, 0)]) for po in (all_ranges(post) if k > 1 else [(0, 0)]))
    s = search(costs, a2a, k_max)
    assert s.step_s == pytest.approx(brute, rel=1e-9, abs=1e-15)
    assert reference_time(costs, a2a, s.k, s.pre_range, s.post_range) == pytest.approx(s.step_s, rel=1e-9, abs=1e-15)
    # step = compute busy + exposed all-to-all; one op at a time per stream
    assert s.step_s == pytest.approx(s.compute_s + s.exposed_comm_s, rel=1e-9, abs=1e-15)
    for stream in ("compute", "comm"):
        evs = sorted((e.start, e.end) for e in s.events if e.stream == stream)
        assert all(b[0] >= a[1] - 1e-15 for a, b in zip(evs, evs[1:]))
    assert s.step_s <= s.unchunked_s * (1 + 1e-12)


def layer(pre_ms=(0.3, 0.2, 0.1), experts_ms=1.0, post_ms=(0.2, 0.3), nbytes=20e6, splittable=True):
    pre = [Op(f"pre{i}", t * MS, splittable, fixed_s=0.01 * MS) for i, t in enumerate(pre_ms)]
    post = [Op(f"post{i}", t * MS, splittable, fixed_s=0.01 * MS) for i, t in enumerate(post_ms)]
    return LayerCosts(pre, nbytes, Op("experts", experts_ms * MS, fixed_s=0.02 * MS), nbytes, post)


def test_k1_is_the_serial_sum():
    costs, a2a = layer(), a2a_model()
    serial = sum(op.time_s for op in (*costs.pre, costs.experts, *costs.post)) + 2 * a2a.time(20e6)
    assert predict(costs, a2a, 1).step_s == pytest.approx(serial, rel=1e-12)
    s = search(costs, a2a, k_max=1)
    assert (s.k, s.step_s, s.unchunked_s) == (1, pytest.approx(serial, rel=1e-12), pytest.approx(serial, rel=1e-12))
    assert s.exposed_comm_s == pytest.approx(2 * a2a.time(20e6), rel=1e-12)


def test_compute_bound_layer_hides_all_communication():
    costs, a2a = layer(pre_ms=(2.0, 1.0), experts_ms=4.0, post_ms=(1.0, 2.0), nbytes=4e6), a2a_model()
    s = search(costs, a2a, k_max=8)
    assert s.k > 1 and s.exposed_comm_s == pytest.approx(0.0, abs=1e-12)
    assert s.step_s == pytest.approx(s.compute_s, rel=1e-12)
    assert predict(costs, a2a, 8, (0, 2), (0, 2)).exposed_comm_s == pytest.approx(0.0, abs=1e-12)
    assert predict(costs, a2a, 1).exposed_comm_s > 0


def test_latency_bounds_k_and_explain_says_why():
    # 100 us of latency per piece against 1.4 ms of transfer each way: a few chunks win, eight lose to latency
    costs, a2a = layer(pre_ms=(0.5, 0.5), experts_ms=1.0, post_ms=(0.5, 0.5), nbytes=80e6), a2a_model(100e-6)
    s = search(costs, a2a, k_max=8)
    assert 1 < s.k < 8
    lines = s.explain().splitlines()
    assert lines[0].startswith(f"k={s.k}: chunking")
    assert "latency paid 16 times" in next(line for line in lines if line.startswith("k=8:"))
    assert "more all-to-all exposed" in next(line for line in lines if line.startswith("k=1:"))
    tried = dict(s.tried)
    assert all(d.get("step_s", math.inf) >= s.step_s for d in tried.values())


def test_expert_pipelining_only_when_nothing_else_splits():
    costs = layer(splittable=False)
    s = search(costs, a2a_model(), k_max=6)
    assert s.chunked_ops() == () and s.pre_range == (3, 3) and s.post_range == (0, 0)


def test_bad_ranges_are_refused():
    costs, a2a = layer(), a2a_model()
    with pytest.raises(MoecError, match="not a range"):
        predict(costs, a2a, 2, pre_range=(2, 5))
    with pytest.raises(MoecError, match="cannot be chunked"):
        predict(layer(splittable=False), a2a, 2, pre_range=(1, 3))
    with pytest.raises(MoecError, match="k_max"):
        search(costs, a2a, k_max=0)
    with pytest.raises(MoecError, match="names no op or stage"):
        search(costs, a2a, wgrads=[WGrad("w", 1e-4, after="attention")])
    with pytest.raises(MoecError, match="distinct names"):
        search(costs, a2a, wgrads=[WGrad("w", 1e-4), WGrad("w", 2e-4)])


def wgrad_layer():
    # 1 ms all-to-alls with nothing to overlap: two 1 ms idle windows
    lat = AllToAllModel(1 * MS, 1e30, world_size=2)
    return LayerCosts([], 1.0, Op("experts", 0.1 * MS, False), 1.0, [Op("post", 0.1 * MS, False)]), lat


def test_weight_gradients_fill_idle_windows():
    costs, a2a = wgrad_layer()
    w = [WGrad("a", 0.5 * MS, 10), WGrad("b", 0.8 * MS, 10), WGrad("c", 0.3 * MS, 10, after="post")]
    s = search(costs, a2a, k_max=1, wgrads=w)
    where = {p.name: (p.under, p.start / MS, p.end / MS) for p in s.placed}
    assert where == {"b": ("dispatch 0", 0.0, pytest.approx(0.8)), "a": ("combine 0", pytest.approx(1.1),
                                                                          pytest.approx(1.6))}
    assert s.unplaced == ("c",)                                  # ready only at the end
    assert s.step_s == pytest.approx(2.2 * MS + 0.3 * MS)
    assert s.unchunked_s == pytest.approx(2.2 * MS + 1.6 * MS)
    assert s.exposed_comm_s == pytest.approx(0.7 * MS)
    compute = sorted((e.start, e.end) for e in s.events if e.stream == "compute")
    assert all(b[0] >= a[1] - 1e-15 for a, b in zip(compute, compute[1:]))
    assert "weight gradient b runs under dispatch 0" in s.explain()


def test_weight_gradients_respect_the_memory_budget():
    costs, a2a = wgrad_layer()
    # a must wait from t=0 to the second window, holding 100 bytes; b runs at t=0 and holds nothing
    w = [WGrad("a", 0.5 * MS, 100), WGrad("b", 0.8 * MS, 100)]
    s = search(costs, a2a, k_max=1, wgrads=w, memory_budget_bytes=99)
    assert [p.name for p in s.placed] == ["b"] and s.unplaced == ("a",)
    s = search(costs, a2a, k_max=1, wgrads=w, memory_budget_bytes=100)
    assert sorted(p.name for p in s.placed) == ["a", "b"] and s.unplaced == ()
