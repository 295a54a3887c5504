"""Choose how to chunk one MoE layer so its all-to-alls overlap compute (Lancet, MLSys 2024).

Interface (plain numbers; no graphs):
    costs = LayerCosts(pre=(Op, ...), dispatch_bytes=..., experts=Op, combine_bytes=..., post=(Op, ...))
        pre: ops in program order up to the dispatch (out-proj, residual, norm, router, permute),
        post: ops in program order after the combine (unpermute, residual, next norm, projections);
        bytes as `AllToAllModel.time` takes them (a number, a per-peer list, a (W, W) matrix)
    sched = search(costs, a2a: AllToAllModel, k_max=8, wgrads=(), memory_budget_bytes=inf) -> Schedule
    sched = predict(costs, a2a, k, pre_range=None, post_range=None, wgrads=(), memory_budget_bytes=inf)
    Schedule: k; pre_range, post_range ([lo, hi) into costs.pre / costs.post: run as k chunks);
        step_s (predicted); unchunked_s (k=1, the serial sum); exposed_comm_s (all-to-all time with
        the compute stream idle); comm_s; events (Event(stream, stage, label, chunk, start, end),
        by start; chunk -1 = whole op); tried (per k: step, exposed, comm, compute, or pruned);
        placed (WGradPlacement), unplaced (names); explain(); idle_gaps(); unchunked(); as_dict()
    WGrad(name, time_s, bytes_held, after="") — a weight-gradient op for the backward: ready once
        the event(s) labelled or staged `after` have ended; `search` puts such ops into the compute
        stream's idle time under in-flight all-to-alls (greedy, within memory_budget_bytes).
The backward is searched the same way: pre = ops before the first backward all-to-all (the post-ops'
input gradients), dispatch = the combine's backward all-to-all, and so on; the weight-gradient ops
go in `wgrads`. Every rank must call with the same numbers (see cost_model.py) so all agree on k.

The model: two in-order streams, compute and comm (one communicator serialises the all-to-alls).
With k chunks the program is stage-major, as a pass that loops over chunks per stage emits it:
    compute: pre[:lo] | pre[lo:hi] chunk 0, chunk 1, ... | pre[hi:] | experts 0..k-1 | post[:lo] |
             post[lo:hi] chunk 0, chunk 1, ... | post[hi:]
    comm:    dispatch 0..k-1 | combine 0..k-1
Dispatch i waits for chunk i of the pre range (all pre-ops where the range does not end at the
dispatch), experts i for dispatch i, combine i for experts i, post chunk i for combine i (all
combines where the post range does not start at the combine). An op starts when its stream is
free and its inputs are ready, so each start is a max-plus recurrence over the ops before it
(a dynamic program over stages x chunks, linear in the events).

The search is exact over k in 1..k_max and every contiguous range of splittable pre- and post-ops,
with two prunings that keep it so:
  - dominance: a pre range that does not end at the dispatch is followed by a whole op that waits
    for all its chunks, so no dispatch starts before all pre-ops finish, as with no range, while
    chunking never costs less (Op.chunk_s(k) >= time_s / k) and start times are monotone in
    durations; likewise a post range not starting at the combine. So only pre suffixes
    [lo, len(pre)) and post prefixes [0, hi) are tried: O(k_max * |pre| * |post|) timelines;
  - a lower bound per k, max(total compute, k*(dispatch+combine chunk), dispatch + experts chunk
    + k*combine chunk), skips a k that cannot beat the best found.
Weight-gradient placement is greedy (largest first into each idle gap, in time order, where it
fits whole and its memory, held from its ready time to its start, keeps the peak within the
budget); the search minimises the timeline plus the weight-gradient time left unplaced, which is
counted as run serially.

Limits of the model: each chunk carries 1/k of every rank's bytes (routing alike in every chunk);
overlapped compute and communication do not slow each other (in practice the collective takes
SMs and memory bandwidth); in dropless mode each chunk needs its own split-size exchange and host
sync, which the caller should add to the all-to-all latency; a weight-gradient op is never split.
"""
import dataclasses
import math
from dataclasses import dataclass, field

from moec.codegen.errors import MoecError

from .cost_model import AllToAllModel, Op

STAGES = ("pre", "dispatch", "experts", "combine", "post", "wgrad")
_EPS = 1e-12


@dataclass(frozen=True, eq=False)
class LayerCosts:
    pre: tuple
    dispatch_bytes: object
    experts: Op
    combine_bytes: object
    post: tuple
    rank: int = 0                # which entry of per-peer byte lists is this rank

    def __post_init__(self):
        object.__setattr__(self, "pre", tuple(self.pre))
        object.__setattr__(self, "post", tuple(self.post))
        for op in (*self.pre, self.experts, *self.post):
            if not isinstance(op, Op):
                raise MoecError(f"LayerCosts takes moec.runtime.Op records, got {op!r}; build them with "
                                f"Op(name, time_s, splittable) or ComputeModel.op(...)")


@dataclass(frozen=True)
class Event:
    stream: str                  # "compute" or "comm"
    stage: str                   # one of STAGES
    label: str                   # op name, "dispatch", "experts", "combine"
    chunk: int                   # 0..k-1, or -1 for an op run whole
    start: float
    end: float


@dataclass(frozen=True)
class WGrad:
    name: str
    time_s: float
    bytes_held: float = 0.0      # memory its inputs keep alive from its ready time until it runs
    after: str = ""              # ready when the events of this label or stage end ("": at once)


@dataclass(frozen=True)
class WGradPlacement:
    name: str
    gap: int                     # index into Schedule.idle_gaps() of the schedule without wgrads
    under: str                   # the all-to-all in flight, e.g. "combine 2"
    start: float
    end: float


@dataclass(frozen=True, eq=False)
class Schedule:
    k: int
    pre_range: tuple
    post_range: tuple
    step_s: float
    unchunked_s: float
    exposed_comm_s: float
    comm_s: float
    events: tuple
    tried: tuple = ()            # (k, dict(step_s, exposed_s, comm_s, compute_s)), or for a k the lower
                                 # bound ruled out, (k, dict(pruned_below, comm_s, compute_s))
    placed: tuple = ()
    unplaced: tuple = ()
    costs: LayerCosts = field(default=None, repr=False)
    a2a: AllToAllModel = field(default=None, repr=False)
    wgrads: tuple = field(default=(), repr=False)

    @property
    def compute_s(self) -> float:
        return sum(e.end - e.start for e in self.events if e.stream == "compute") + \
            sum(w.time_s for w in self.wgrads if w.name in self.unplaced)

    def chunked_ops(self) -> tuple:
        (a, b), (c, d) = self.pre_range, self.post_range
        return tuple(op.name for op in (*self.costs.pre[a:b], *self.costs.post[c:d]))

    def idle_gaps(self) -> list:
        """(start, end, all-to-all in flight) where the comm stream is busy and compute idle."""
        return _idle_gaps(self.events)

    def unchunked(self) -> "Schedule":
        """The serial schedule this one is compared with: k = 1, weight gradients where they are."""
        base = predict(self.costs, self.a2a, 1)
        return dataclasses.replace(base, step_s=self.unchunked_s, unchunked_s=self.unchunked_s, wgrads=self.wgrads,
                                   unplaced=tuple(w.name for w in self.wgrads))

    def explain(self) -> str:
        return _explain(self)

    def as_dict(self) -> dict:
        return {"k": self.k, "chunked_ops": list(self.chunked_ops()), "pre_range": list(self.pre_range),
                "post_range": list(self.post_range), "step_s": self.step_s, "unchunked_s": self.unchunked_s,
                "exposed_comm_s": self.exposed_comm_s, "comm_s": self.comm_s,
                "events": [e.__dict__ for e in self.events], "tried": [[k, d] for k, d in self.tried],
                "placed": [p.__dict__ for p in self.placed], "unplaced": list(self.unplaced),
                "explain": self.explain()}


def search(costs: LayerCosts, a2a: AllToAllModel, k_max: int = 8, wgrads=(), memory_budget_bytes: float = math.inf
           ) -> Schedule:
    """The chunk count and chunked ranges with the least predicted time (see the module docstring)."""
    if k_max < 1:
        raise MoecError(f"schedule search: k_max={k_max}; give k_max >= 1")
    comm = _Comm(costs, a2a)
    wgrads = _checked(wgrads)
    pre_los = [len(costs.pre)]                   # pre ranges [lo, len(pre)), the empty one first
    while pre_los[-1] > 0 and costs.pre[pre_los[-1] - 1].splittable:
        pre_los.append(pre_los[-1] - 1)
    post_his = [0]                               # post ranges [0, hi)
    while post_his[-1] < len(costs.post) and costs.post[post_his[-1]].splittable:
        post_his.append(post_his[-1] + 1)

    best, best_obj, tried = None, math.inf, []
    serial = sum(op.time_s for op in (*costs.pre, *costs.post))
    for k in range(1, k_max + 1):
        d, c, x = comm.dispatch(k), comm.combine(k), costs.experts.chunk_s(k)
        compute_bound = serial + k * x + sum(w.time_s for w in wgrads)
        bound = max(compute_bound, k * (d + c), d + x + k * c)
        if bound >= best_obj * (1 - 1e-9):
            tried.append((k, {"pruned_below": bound, "comm_s": k * (d + c), "compute_s": compute_bound}))
            continue
        best_k = None
        for lo in (pre_los if k > 1 else pre_los[:1]):
            for hi in (post_his if k > 1 else post_his[:1]):
                events = _timeline(costs, comm, k, (lo, len(costs.pre)), (0, hi))
                placed, unplaced, events = _place(events, wgrads, memory_budget_bytes)
                obj = _makespan(events) + sum(w.time_s for w in unplaced)
                if best_k is None or obj < best_k[0] * (1 - 1e-9):
                    best_k = (obj, (lo, len(costs.pre)), (0, hi), events, placed, unplaced)
        obj, pr, po, events, placed, unplaced = best_k
        tried.append((k, {"step_s": obj, "exposed_s": _exposed(events), "comm_s": k * (d + c),
                          "compute_s": _busy(events, "compute") + sum(w.time_s for w in unplaced)}))
        if obj < best_obj * (1 - 1e-9):
            best_obj, best = obj, (k, pr, po, events, placed, unplaced)
    k, pr, po, events, placed, unplaced = best
    return _schedule(costs, a2a, comm, k, pr, po, events, placed, unplaced, wgrads, tuple(tried))


def predict(costs: LayerCosts, a2a: AllToAllModel, k: int, pre_range=None, post_range=None, wgrads=(),
            memory_budget_bytes: float = math.inf) -> Schedule:
    """The schedule for a given chunk count and ranges (default: nothing but the experts chunked)."""
    n, m = len(costs.pre), len(costs.post)
    pre_range, post_range = tuple(pre_range or (n, n)), tuple(post_range or (0, 0))
    for what, (lo, hi), ops in (("pre_range", pre_range, costs.pre), ("post_range", post_range, costs.post)):
        if not 0 <= lo <= hi <= len(ops):
            raise MoecError(f"{what}={(lo, hi)} is not a range [lo, hi) within the {len(ops)} ops given")
        if k > 1 and not all(op.splittable for op in ops[lo:hi]):
            raise MoecError(f"{what}={(lo, hi)} includes ops that cannot be chunked: "
                            f"{[op.name for op in ops[lo:hi] if not op.splittable]}")
    if k < 1:
        raise MoecError(f"chunk count k={k}: must be >= 1")
    comm, wgrads = _Comm(costs, a2a), _checked(wgrads)
    events = _timeline(costs, comm, k, pre_range, post_range)
    placed, unplaced, events = _place(events, wgrads, memory_budget_bytes)
    return _schedule(costs, a2a, comm, k, pre_range, post_range, events, placed, unplaced, wgrads, ())


def _checked(wgrads) -> tuple:
    wgrads = tuple(wgrads)
    names = [w.name for w in wgrads]
    if len(set(names)) < len(names):
        raise MoecError(f"weight-gradient ops need distinct names (placements are reported by name): {names}")
    for w in wgrads:
        if not (w.time_s >= 0 and w.bytes_held >= 0 and math.isfinite(w.time_s)):
            raise MoecError(f"WGrad {w.name!r}: time_s={w.time_s}, bytes_held={w.bytes_held}; give finite values >= 0")
    return wgrads


class _Comm:
    """Per-chunk all-to-all times, the bandwidth part computed once."""

    def __init__(self, costs, a2a):
        self.a2a, self.rank = a2a, costs.rank
        self.d_lat = a2a.latency(a2a._world(costs.dispatch_bytes))
        self.c_lat = a2a.latency(a2a._world(costs.combine_bytes))
        self.d_xfer = a2a.transfer_s(costs.dispatch_bytes, costs.rank)
        self.c_xfer = a2a.transfer_s(costs.combine_bytes, costs.rank)

    def dispatch(self, k):
        return self.d_lat + self.d_xfer / k

    def combine(self, k):
        return self.c_lat + self.c_xfer / k


def _timeline(costs: LayerCosts, comm: _Comm, k: int, pre_range, post_range) -> list:
    """Events of the stage-major program (module docstring), each op at max(stream free, inputs)."""
    events, free = [], {"compute": 0.0, "comm": 0.0}

    def run(stream, stage, label, chunk, dur, ready=0.0):
        start = max(free[stream], ready)
        free[stream] = start + dur
        events.append(Event(stream, stage, label, chunk, start, start + dur))
        return start + dur

    (lo, hi), n = pre_range, len(costs.pre)
    for op in costs.pre[:lo]:
        run("compute", "pre", op.name, -1, op.time_s)
    chunk_done = []
    for i in range(k):
        for op in costs.pre[lo:hi]:
            run("compute", "pre", op.name, i, op.chunk_s(k))
        chunk_done.append(free["compute"])
    for op in costs.pre[hi:]:
        run("compute", "pre", op.name, -1, op.time_s)
    to_dispatch = chunk_done if hi == n and lo < hi else [free["compute"]] * k
    sent = [run("comm", "dispatch", "dispatch", i, comm.dispatch(k), to_dispatch[i]) for i in range(k)]
    done = [run("compute", "experts", costs.experts.name, i, costs.experts.chunk_s(k), sent[i]) for i in range(k)]
    back = [run("comm", "combine", "combine", i, comm.combine(k), done[i]) for i in range(k)]
    lo, hi = post_range
    for op in costs.post[:lo]:
        run("compute", "post", op.name, -1, op.time_s, back[-1])
    for i in range(k):
        for op in costs.post[lo:hi]:
            run("compute", "post", op.name, i, op.chunk_s(k), back[i] if lo == 0 else back[-1])
    for op in costs.post[hi:]:
        run("compute", "post", op.name, -1, op.time_s, back[-1])
    return events


def _place(events, wgrads, budget):
    """Greedy weight-gradient placement -> (placements, unplaced WGrads, events with them added)."""
    if not wgrads:
        return (), (), sorted(events, key=_order)
    ready = {w.name: _ready_at(events, w.after) for w in wgrads}
    held, placed, left = [], [], sorted(wgrads, key=lambda w: -w.time_s)
    for g, (g0, g1, under) in enumerate(_idle_gaps(events)):
        t = g0
        for w in list(left):
            start = max(t, ready[w.name])
            if start + w.time_s > g1 + _EPS or not _fits(held, (ready[w.name], start, w.bytes_held), budget):
                continue
            held.append((ready[w.name], start, w.bytes_held))
            placed.append(WGradPlacement(w.name, g, under, start, start + w.time_s))
            left.remove(w)
            t = start + w.time_s
    added = [Event("compute", "wgrad", p.name, -1, p.start, p.end) for p in placed]
    unplaced = tuple(w for w in wgrads if w in left)
    return tuple(sorted(placed, key=lambda p: p.start)), unplaced, sorted(events + added, key=_order)


def _fits(held, new, budget) -> bool:
    """Peak of the bytes held (each from its ready time until it starts) stays within budget."""
    spans = held + [new]
    return all(sum(b for r, s, b in spans if r <= t < s) <= budget for t in {r for r, s, b in spans if r < s})


def _ready_at(events, after: str) -> float:
    if not after:
        return 0.0
    ends = [e.end for e in events if after in (e.label, e.stage)]
    if not ends:
        raise MoecError(f"WGrad after={after!r} names no op or stage of this layer; use one of "
                        f"{sorted({e.label for e in events} | {e.stage for e in events})} or '' (ready at once)")
    return max(ends)


def _order(e: Event):
    return (e.start, e.stream, e.end)


def _makespan(events) -> float:
    return max((e.end for e in events), default=0.0)


def _busy(events, stream) -> float:
    return sum(e.end - e.start for e in events if e.stream == stream)


def _idle_gaps(events, eps=_EPS) -> list:
    """Comm intervals minus compute intervals (both streams run one op at a time), without the
    gaps under eps (float noise, for the picture; the exposed total keeps them all)."""
    compute = sorted((e.start, e.end) for e in events if e.stream == "compute" and e.end > e.start)
    gaps = []
    for e in sorted((e for e in events if e.stream == "comm"), key=_order):
        t = e.start
        for a, b in compute:
            if b <= t or a >= e.end:
                continue
            if a > t + eps:
                gaps.append((t, a, f"{e.label} {e.chunk}"))
            t = max(t, b)
        if e.end > t + eps:
            gaps.append((t, e.end, f"{e.label} {e.chunk}"))
    return gaps


def _exposed(events) -> float:
    # every gap: an all-to-all shorter than _EPS (tiny messages) is still the whole step's comm
    return sum(b - a for a, b, _ in _idle_gaps(events, 0.0))


def _schedule(costs, a2a, comm, k, pre_range, post_range, events, placed, unplaced, wgrads, tried) -> Schedule:
    serial = sum(op.time_s for op in (*costs.pre, costs.experts, *costs.post)) + comm.dispatch(1) + comm.combine(1)
    return Schedule(k, pre_range, post_range, _makespan(events) + sum(w.time_s for w in unplaced),
                    serial + sum(w.time_s for w in wgrads), _exposed(events), k * (comm.dispatch(k) + comm.combine(k)),
                    tuple(events), tried, placed, tuple(w.name for w in unplaced), costs, a2a, wgrads)


def format_time(s: float) -> str:
    """Seconds as "1.23 ms", or "45.6 us" under 0.1 ms (0 is "0 ms")."""
    return f"{s * 1e3:.3g} ms" if s >= 1e-4 or s == 0 else f"{s * 1e6:.3g} us"


def _explain(s: Schedule) -> str:
    names = s.chunked_ops()
    what = f"chunking {'+'.join(names)} with the experts" if names else "chunking the experts only"
    gain = 1 - s.step_s / s.unchunked_s if s.unchunked_s else 0.0
    headline = f"k={s.k}: {what}: {format_time(s.step_s)} predicted vs {format_time(s.unchunked_s)} unchunked " \
        f"({gain:.0%} less)"
    lines = [headline if s.k > 1 else f"k=1: no chunking pays off: {format_time(s.step_s)} predicted (the serial sum)"]
    behind = {}
    for e in s.events:
        if e.stream == "compute":
            ov = sum(max(0.0, min(e.end, c.end) - max(e.start, c.start)) for c in s.events if c.stream == "comm")
            if ov > _EPS:
                behind[e.label] = behind.get(e.label, 0.0) + ov
    hidden = s.comm_s - s.exposed_comm_s
    top = sorted(behind.items(), key=lambda kv: -kv[1])
    shown = [f"{lbl} {format_time(t)}" for lbl, t in top[:4]] + ([f"{len(top) - 4} more"] if len(top) > 4 else [])
    lines.append(f"all-to-all {format_time(s.comm_s)} per layer in {2 * s.k} pieces: {format_time(hidden)} hidden "
                 f"behind {' + '.join(shown) or 'no compute'}, {format_time(s.exposed_comm_s)} exposed")
    chosen = dict(s.tried).get(s.k)
    for k, d in s.tried:
        if k == s.k:
            continue
        if "pruned_below" in d:
            why = (f"the all-to-all alone takes {format_time(d['comm_s'])}, latency paid {2 * k} times"
                   if d["pruned_below"] > d["compute_s"] else f"compute alone takes {format_time(d['compute_s'])}")
            lines.append(f"k={k}: cannot beat it: {why}")
            continue
        why = ""
        if chosen:
            deltas = {"more all-to-all exposed": d["exposed_s"] - chosen["exposed_s"],
                      f"latency paid {2 * k} times (all-to-all {format_time(d['comm_s'])})":
                          d["comm_s"] - chosen["comm_s"],
                      "per-chunk overheads": d["compute_s"] - chosen["compute_s"]}
            reason, delta = max(deltas.items(), key=lambda kv: kv[1])
            why = f": {reason}" if delta > _EPS else ""
        lines.append(f"k={k}: {format_time(d['step_s'])} (+{format_time(d['step_s'] - s.step_s)}){why}")
    if s.wgrads:
        for p in s.placed:
            lines.append(f"weight gradient {p.name} runs under {p.under} ({format_time(p.end - p.start)})")
        if s.unplaced:
            lines.append(f"weight gradients left where they are (no room or over the memory budget): "
                         f"{', '.join(s.unplaced)}")
    return "\n".join(lines)
