"""Pass `chunk_tokens`: pipeline each expert-parallel MoE layer over k chunks of its tokens, so the
all-to-alls of one chunk travel while another chunk computes (Lancet, MLSys 2024, forward part).

Expects: `ep_experts` calls made by `expert_parallel` (else the pass changes nothing), each fed by
`moec.route` -> `moec.plan` and read by `moec.combine` as `rewrite` emits them. A symbolic token
count (dynamic shapes) chunks the layer's own ops only: the neighbours' rules need sizes to check.
Guarantees: the layer computes the same values (up to float rounding of smaller GEMMs). Dropless
(`ep_capacity_factor` 0), with k > 1 chunks of rows of the layer's (T, H) input as torch.tensor_split
cuts them:

    A(i): pre ops (chunk i); route, plan (chunk i); d_i = ep_dispatch(chunk i)   # started
    B(i): side ops (chunk i); y_i = ep_local_experts(ep_wait(d_i)); c_i = ep_combine(y_i)
    C(i): ep_collect(ep_wait(c_i)); combine (chunk i); post ops (chunk i)
    order: A(0) A(1) B(0) A(2) B(1) C(0) ... A(i+1) B(i) C(i-1) ... B(k-1) C(k-2) C(k-1)
    values read outside the block: torch.cat of their chunks

pre ops: the token-local ops the layer's input and router logits come from (norm, residual add,
router, attention output projection...), up to the first op that is not token-local; post ops:
the token-local ops after the combine (residual add, next norm, next projections...); side ops:
token-local ops fed by the pre ops and feeding the post ops without passing the experts (a shared
expert), run under the dispatches. Token-locality is inferred from shapes and checked on random
inputs (passes/token_locality.py); each layer's chunked ranges and k come from the cost model
(`schedule_search.search`, same k on every rank, see chunk_costs.py) or `Config.ep_chunks`.
Capacity mode (`ep_capacity_factor` > 0): which copies are kept depends on all earlier tokens, so
tokens are not chunked; the layer's (E, C, H) slots are cut into k pieces along C instead, each
piece dispatched, computed and combined in turn (the Tutel overlap, experts only).
Every all-to-all is started where its inputs are ready and waited for just before its first use.
Must not change: nodes outside the chunked ranges, other than their order (nodes that read the
layer move after it) and reading concatenated values.
"""
import dataclasses
import logging
import operator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true

from moec.codegen.errors import MoecError
from moec.runtime import load_or_calibrate, search
from moec.runtime.consistency import decided, decided_once
from moec.runtime.cost_model import cached_calibration
from moec.runtime.expert_parallel import (ep_collect, ep_combine, ep_dispatch, ep_experts, ep_local_experts,
                                          ep_wait)
from moec.runtime.mesh import resolve_ep_group

from . import token_locality as tl
from .chunk_costs import K_MAX, agree, agree_sequences, as_agreed, forced, layer_costs
from .expert_parallel import WHOLE_LAYER
from .graph import DepGraph, module_path, value

log = logging.getLogger("moec")

PASS = "chunk_tokens"
# why a node no rule made local stopped a range (_stop collects those for the sequence cut)
_NOT_LOCAL = "not token-local by its shapes"
_CHECK_FAILED = "chunked and whole differ on random inputs"
_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


@dataclass(frozen=True)
class LayerChunking:
    site: str
    mode: str            # "dropless" (token chunks) or "capacity" (pieces of the slots)
    k: int               # 1: left whole
    pre: tuple           # names of the ops before the dispatch run in k chunks, program order
    side: tuple          # ops beside the experts run in k chunks under the dispatches
    post: tuple          # ops after the combine run in k chunks
    stops: tuple         # (node, why) where the token-local ranges end
    why: str             # how k was chosen
    schedule: object = None   # moec.runtime.Schedule predicted for this layer (None: no a2a model)
    units: str = "tokens"     # what the chunks are cut in: tokens, or whole sequences ("2 sequences of 4 tokens")

    def summary(self) -> str:
        what = "slots" if self.mode == "capacity" else \
            f"{self.units}, with {len(self.pre)} ops before, {len(self.side)} beside, {len(self.post)} after"
        head = f"{self.site}: k={self.k} ({self.why})" + (f", {what}" if self.k > 1 else ", left whole")
        return head + (f"; {self.schedule.explain().splitlines()[0]}" if self.schedule is not None else "")

    def text(self) -> str:
        lines = [self.summary(), ""]
        for title, names in (("chunked before the dispatch", self.pre), ("chunked beside the experts", self.side),
                             ("chunked after the combine", self.post)):
            lines.append(f"{title}: {', '.join(names) or '-'}")
        lines.append("token-local ranges end at: " + (", ".join(f"{n} ({why})" for n, why in self.stops) or "-"))
        if self.schedule is not None:
            lines += ["", self.schedule.explain()]
        return "\n".join(lines)


@dataclass(frozen=True)
class ChunkTokensReport:
    layers: tuple        # LayerChunking per expert-parallel layer, graph order
    skipped: tuple = ()  # (site, why) for layers left whole

    def log_lines(self) -> list:
        """A line per chunked layer (the pipeline logs `skipped` apart)."""
        return [layer.summary() for layer in self.layers if layer.k > 1]


# Per-chunk moec ops go through these plain functions, not as torch.ops.moec nodes: to the dense
# backends' partitioner (moec/dense.py) a chunked layer is then one dense region, so the dispatch
# handles (Python values) stay inside one traced function, as they do inside ep_experts.
def chunk_route(*args):
    return torch.ops.moec.route.default(*args)


def chunk_plan(ids, num_experts):
    return torch.ops.moec.plan.default(ids, num_experts)


def chunk_combine(y, inv, weights):
    return torch.ops.moec.combine.default(y, inv, weights)


@dataclass
class _Layer:
    """One expert-parallel MoE layer and its token-local neighbourhood."""
    ep: fx.Node
    route: fx.Node | None      # None in capacity mode, where only ep changes
    plan: fx.Node | None
    combine: fx.Node | None
    x: fx.Node
    T: int
    U: int               # units the chunks are cut in: T (tokens) or the batch's sequences
    top_k: int
    num_experts: int
    ep_size: int
    weights: list
    core: list           # route and its items, ops on the routing weights, plan and its items
    pre: list = dataclasses.field(default_factory=list)
    side: list = dataclasses.field(default_factory=list)
    post: list = dataclasses.field(default_factory=list)
    rules: dict = dataclasses.field(default_factory=dict)
    stops: list = dataclasses.field(default_factory=list)
    blocked: list = dataclasses.field(default_factory=list)   # ops next to the range that no rule made local


def chunk_tokens(gm: fx.GraphModule, ctx) -> tuple:
    cfg = ctx.config
    eps = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ep_experts]
    if cfg.ep_group is None or not eps or cfg.ep_chunks == 1:
        return gm, ChunkTokensReport((), tuple((_site(n), "ep_chunks=1") for n in eps))
    group = resolve_ep_group(cfg.ep_group)
    pg = dist.distributed_c10d._resolve_process_group(group.name)
    device = value(eps[0].args[0]).device
    # a forced k needs no agreement: read a cached calibration only, for the report (no collective)
    try:
        calibration = cached_calibration(device, pg, cfg.cache_dir or None) if cfg.ep_chunks else \
            decided_once(("calibration", str(device), group.name, cfg.cache_dir),
                         lambda: load_or_calibrate(device, pg, cache_dir=cfg.cache_dir or None))
    except MoecError as e:
        # Every rank measured the same (slowest-rank) times, so every rank lands here together and
        # the layers stay whole everywhere: a correct, unchunked step, said in the log and the dump.
        why = f"no chunking: the cost model could not be calibrated ({e})"
        log.warning("chunk_tokens: %s", why)
        counters["moec"]["chunk_calibration_failed"] += 1
        return gm, ChunkTokensReport((), tuple((_site(n), why) for n in eps))
    layers, skipped = [], []
    for ep in eps:
        site = _site(ep)
        capacity = ep.kwargs.get("capacity_factor", 0.0) > 0
        a2a = calibration.all_to_all if calibration is not None else None
        if a2a is not None and not capacity:   # each chunk also exchanges counts and syncs: one more latency
            a2a = dataclasses.replace(a2a, latency_s=2 * a2a.latency_s)
        costs = lambda layer: layer if isinstance(layer, str) or calibration is None else \
            layer_costs(layer, calibration.compute, {n: r.kind for n, r in layer.rules.items()},
                        ep.kwargs.get("capacity_factor", 0.0))   # noqa: E731
        layer = _find(gm, ep, group.size, capacity)
        # (k, whole sequences) the ranks agreed on at an earlier compile: a recompile takes them again
        # with no collective (it may happen on this rank only)
        key = ("chunk_tokens", group.name, site, cfg.ep_chunk_by, cfg.cache_dir, ep.args[3],
               *value(ep.args[2]).shape, value(ep.args[0]).shape[1:])   # top-k, E + 1, H
        prior = None if cfg.ep_chunks else decided(key)
        if not capacity and cfg.ep_chunk_by != "tokens" and (prior is None or prior[1]):
            layer = _cut(gm, ep, group.size, layer, cfg.ep_chunks or (prior[0] if prior else 0), costs, a2a, pg,
                         cfg.ep_chunk_by == "sequences" or prior is not None)
        mine = costs(layer)
        if cfg.ep_chunks:
            ranges = (0, 0) if isinstance(layer, str) else (len(layer.pre), len(layer.post))
            k, pre_r, post_r, sched, why = forced(mine, a2a, cfg.ep_chunks, *ranges)
        elif prior is not None:
            k, pre_r, post_r, sched, why = as_agreed(mine, a2a, prior[0])
        else:
            k, pre_r, post_r, sched, why = agree(mine, a2a, pg, _k_max(layer))
            decided_once(key, lambda: (k, _in_sequences(layer)))   # the record, for recompiles
        if k == 1:
            skipped.append((site, why))
            layers.append(LayerChunking(site, "capacity" if capacity else "dropless", 1, (), (), (), (), why, sched))
            continue
        if capacity:
            _emit_capacity(gm.graph, layer, k)
        else:
            layer.pre, layer.post = layer.pre[pre_r[0]:pre_r[1]], layer.post[post_r[0]:post_r[1]]
            _emit_chunked(gm.graph, layer, k)
        name = lambda nodes: tuple(n.name for n in nodes)   # noqa: E731
        units = f"{layer.U} sequences of {layer.T // layer.U} tokens" if _in_sequences(layer) else "tokens"
        layers.append(LayerChunking(site, "capacity" if capacity else "dropless", k, name(layer.pre),
                                    name(layer.side), name(layer.post), tuple(layer.stops), why, sched, units))
    gm.graph.lint()
    gm.recompile()
    return gm, ChunkTokensReport(tuple(layers), tuple(skipped))


def _site(ep) -> str:
    return module_path(ep) or ep.name


def _cut(gm, ep, ep_size, layer, forced_k, costs, a2a, group, sequences_wanted=False):
    """The layer cut in tokens, or in whole sequences where an op that mixes the tokens of a
    sequence (attention) ends the token-local range: U = the leading (batch) size of that op's
    values. Whole sequences are taken where they save more by the cost model, every rank
    agreeing (a collective, every rank calls it when k is not forced); with a forced k (every
    candidate op chunked, no collective) or no all-to-all model, where they chunk more ops;
    with sequences_wanted (ep_chunk_by="sequences") wherever there are enough of them."""
    sequences = []
    if not isinstance(layer, str) and isinstance(layer.T, int):
        T = layer.T
        counts = {d for n in layer.blocked for v in (n, *n.all_input_nodes) if isinstance(value(v), torch.Tensor)
                  for d in value(v).shape[:1] if isinstance(d, int) and max(2, forced_k) <= d < T and T % d == 0}
        sequences = [c for c in (_find(gm, ep, ep_size, False, U) for U in sorted(counts)) if not isinstance(c, str)]
    size = lambda c: len(c.pre) + len(c.side) + len(c.post)   # noqa: E731
    if sequences_wanted:
        return max(sequences, key=size, default=layer)
    if forced_k or a2a is None:
        best = max(sequences, key=size, default=None)
        return best if best is not None and size(best) > size(layer) else layer

    def saved(c):                                 # the candidates cover different ops: compare savings
        chosen = search(costs(c), a2a, _k_max(c))
        return chosen.unchunked_s - chosen.step_s
    best = max(sequences, key=saved, default=None)
    mine = (0.0 if isinstance(layer, str) else saved(layer), None if best is None else saved(best))
    return best if agree_sequences(*mine, group) else layer


def _in_sequences(layer) -> bool:
    return not isinstance(layer, str) and layer.U is not layer.T and layer.U != layer.T


def _k_max(layer) -> int:
    """The most chunks a layer can be cut in: K_MAX, or fewer sequences."""
    return min(K_MAX, layer.U) if not isinstance(layer, str) and isinstance(layer.U, int) else K_MAX


# --- finding the layer and its token-local neighbourhood ----------------------------------------

def _find(gm, ep, ep_size, capacity, units=None):
    """The layer with its pre, side and post ops, its chunks cut in `units` (default: the tokens),
    or a string saying why it stays whole."""
    x, src, offsets = ep.args[0], ep.args[1], ep.args[2]
    T = value(x).shape[0]        # symbolic under dynamic shapes: then only the experts are chunked
    weights = [w for w in ep.args[4] if isinstance(w, fx.Node)]
    layer = _Layer(ep, None, None, None, x, T, units or T, ep.args[3], value(offsets).shape[0] - 1, ep_size,
                   weights, [])
    if capacity:                   # the pieces are cut inside the dispatch: nothing around it changes
        return layer
    plan = offsets.args[0] if offsets.target is operator.getitem else None
    if plan is None or plan.target is not torch.ops.moec.plan.default or src.args[0] is not plan:
        return "the experts' slots do not come from moec.plan"
    ids = plan.args[0]
    route = ids.args[0] if ids.target is operator.getitem else None
    if route is None or route.target is not torch.ops.moec.route.default:
        return "the expert ids do not come straight from moec.route (router capacity?)"
    combine = [u for u in ep.users if u.target is torch.ops.moec.combine.default]
    if len(ep.users) != 1 or not combine:
        return "the experts' output is read by more than moec.combine"
    layer.route, layer.plan, layer.combine = route, plan, combine[0]
    deps = DepGraph.build(gm.graph)
    core = _core(layer, deps)
    if isinstance(core, str):
        return core
    layer.core = core
    if isinstance(T, int) and T >= 2:     # else no rule can be checked on random inputs
        _grow(layer, deps)
    return layer


def _core(layer, deps):
    """route, its items, the ops on the routing weights up to combine, plan and its items, with
    rules for the token-local ones; a string if something outside reads what chunks cannot give."""
    route, plan, combine = layer.route, layer.plan, layer.combine
    between = deps.backward_slice([combine.args[2]], stop={route}) & deps.forward_slice([route])
    between -= {route, *route.users}
    core = [route, *route.users, *deps.sorted(between), plan, *plan.users]
    for n in core:
        if n is plan or n.target is operator.getitem and n.args[0] is plan:
            if any(u not in core and u not in (layer.ep, combine) for u in n.users):
                return f"{n.name} (the layer's plan) is also read outside it (expert_stats?)"
            continue
        r = tl.rule(n, layer.U)
        checked = r is not None and (r.kind in ("getitem", "route") or isinstance(layer.T, int) and
                                     tl.verify(n, r, layer.U))
        if not checked:
            return f"{n.name} on the routing weights is not token-local (or cannot be checked: symbolic T)"
        layer.rules[n] = r
    H = value(layer.x).shape[1]
    layer.rules[combine] = tl.Rule("combine", {}, (H,))
    return core


def _grow(layer, deps):
    """The pre, side and post ranges: token-local nodes, convex around the layer (no path leaves
    the chunked nodes and comes back), each edge between two chunked nodes reading chunks as they
    are. Shape rules first, the check on random inputs last (it runs the op)."""
    inside = set(layer.core) | {layer.ep, layer.combine}
    ancestors = deps.backward_slice([layer.x, layer.route.args[0]])
    mutated = {deps.root[m] for m in deps.mutations} | set(deps.mutations)
    pre = set()
    for n in sorted(ancestors - inside, key=deps.order.__getitem__, reverse=True):
        why = _shape_why(layer, n, mutated, deps)
        if not why:
            toward = [u for u in deps.users[n] if u in ancestors or u in inside]
            bad = [u for u in toward if u not in pre and u not in inside or not _compatible(layer, n, u)]
            why = f"read by {bad[0].name}, which is not chunked" if bad else _check_why(layer, n)
        if why:
            _stop(layer, n, why, any(_reads_rows(layer, u, n) for u in deps.users[n] if u in pre or u in inside))
        else:
            pre.add(n)
    # An item taken before its tuple was decided: where the tuple stays whole, so does the item
    # (its readers in the range then cut it like any value from outside).
    pre -= {n for n in pre if layer.rules[n].kind == "getitem" and n.args[0] not in pre | inside}
    layer.pre = deps.sorted(pre)
    chunked = pre | inside
    descendants = deps.forward_slice([layer.combine]) - {layer.combine}
    beside = deps.forward_slice(pre | {layer.x}) - ancestors - descendants - inside
    for group, candidates in (("side", beside), ("post", descendants)):
        depends, taken = deps.forward_slice(chunked), []
        for n in deps.sorted(candidates):
            why = _shape_why(layer, n, mutated, deps)
            if not why:
                bad = [a for a in deps.deps[n] if a in depends and (a not in chunked or not _compatible(layer, a, n))]
                why = f"reads {bad[0].name}, which is not chunked" if bad else _check_why(layer, n)
            if why:
                _stop(layer, n, why, group == "post" and any(a in chunked for a in deps.deps[n]))
                continue
            taken.append(n)
            chunked.add(n)
            depends |= {n}
        setattr(layer, group, taken)


def _shape_why(layer, n, mutated, deps) -> str:
    """'' if the shape rules make n token-local (the rule is recorded), else why not."""
    if n.op in ("placeholder", "get_attr"):
        return "a graph input"
    if n in mutated or deps.root.get(n) in mutated:
        return "written in place"
    if n.target is torch.ops.moec.route.default:
        return "another MoE layer's router"       # left to that layer, whose core it is
    r = tl.rule(n, layer.U)
    if r is None:
        return _NOT_LOCAL
    layer.rules[n] = r
    return ""


def _check_why(layer, n) -> str:
    r = layer.rules[n]
    if r.kind != "getitem" and not tl.verify(n, r, layer.U):
        del layer.rules[n]
        return _CHECK_FAILED
    return ""


def _stop(layer, n, why, next_to_chunked):
    """Record where a range ends, for nodes that carry tokens next to a chunked node."""
    v = value(n)
    if next_to_chunked and why in (_NOT_LOCAL, _CHECK_FAILED):
        layer.blocked.append(n)
    if next_to_chunked and isinstance(v, torch.Tensor) and tl.token_dims(tuple(v.shape), layer.U):
        layer.stops.append((n.name, why))


def _reads_rows(layer, consumer, producer) -> bool:
    """The chunked consumer cuts the producer's value in chunks (not: reads it whole, a weight)."""
    if consumer is layer.ep:
        return producer is layer.x
    rule = layer.rules.get(consumer)
    use = rule.args.get(producer) if rule is not None else None
    return rule is not None and (rule.kind == "getitem" or use is not None and use.rows)


def _compatible(layer, producer, consumer) -> bool:
    """The consumer reads the producer's chunks as they are: rows of the same flat form."""
    if consumer is layer.ep:
        use = tl.ArgUse(True, (value(layer.x).shape[1],)) if producer is layer.x else None
    else:
        rule = layer.rules.get(consumer)
        if rule is not None and rule.kind == "getitem":
            return True
        use = rule.args.get(producer) if rule is not None else None
    made = layer.rules.get(producer)
    if use is None or made is None or not use.rows or use.expand is not None:
        return False
    return isinstance(value(producer), torch.Tensor) and tuple(use.rest) == tuple(made.out_rest)


# --- emitting the chunked layer -----------------------------------------------------------------

class _Block:
    """Emits nodes in order before `anchor`; keeps the chunks of each chunked node by (node, i)."""

    def __init__(self, graph, layer, k, anchor):
        self.graph, self.layer, self.anchor = graph, layer, anchor
        self.k = k
        self.sizes = tl.chunk_sizes(layer.U, k) if isinstance(layer.T, int) else [None] * k   # units
        self.chunks, self.flat, self.nodes = {}, {}, []
        self.old = set(graph.nodes)

    def call(self, target, args, kwargs=None, like=None, op="call_function"):
        with self.graph.inserting_before(self.anchor):
            self.graph.create_node(op, target, args, kwargs or {})
        return self._made(like)

    def _made(self, like):
        """Stamp the nodes just emitted (those between the last known one and the anchor)."""
        new, n = [], self.anchor.prev
        while n not in self.old:
            new.append(n)
            n = n.prev
        for n in reversed(new):
            if like is not None:
                n.meta.update({key: like.meta[key] for key in _META if key in like.meta})
            n.meta["moec_pass"] = PASS
            self.old.add(n)
            self.nodes.append(n)
        return self.anchor.prev

    def input(self, a, use, i):
        """Input `a` of a chunk-i node, as `use` reads it: its chunk, or a row slice of it whole."""
        if (a, i) in self.chunks:
            return self.chunks[(a, i)]
        key = (a, str(use))                   # str: a symbolic size does not hash
        if key not in self.flat:
            with self.graph.inserting_before(self.anchor):
                flat = tl.flat_input(self.graph, a, use, self.layer.T, tuple(value(a).shape))
            flat = self._made(a) if flat is not a else a
            rows = tl.flat_rows(use.expand or tuple(value(a).shape), use.rest, self.layer.T)
            if not use.rows:
                self.flat[key] = flat
            elif not isinstance(rows, int) or rows == self.layer.U:
                # a row per unit: as torch.tensor_split cuts them (tl.chunk_sizes), symbolic T too
                self.flat[key] = self.call(torch.tensor_split, (flat, self.k), like=a)
            else:                             # m rows per unit
                m = rows // self.layer.U
                self.flat[key] = self.call(torch.split, (flat, [m * u for u in self.sizes]), like=a)
        if not use.rows:
            return self.flat[key]
        return self.call(operator.getitem, (self.flat[key], i), like=a)

    def node(self, n, i):
        """Chunk i of a chunked node, by its rule."""
        r = self.layer.rules[n]
        if r.kind == "getitem":
            ins = {n.args[0]: self.chunks[(n.args[0], i)]}
        else:
            ins = {a: self.input(a, r.args.get(a, tl.ArgUse(False)), i) for a in n.all_input_nodes}
        with self.graph.inserting_before(self.anchor):
            r.emit(self.graph, n, ins, self.sizes[i])
        self.chunks[(n, i)] = self._made(n)
        return self.chunks[(n, i)]


def _emit_chunked(graph, layer, k):
    """The stages of the module docstring, software-pipelined; then the reads from outside, then
    the order of the graph around the block."""
    ep, combine, route, plan = layer.ep, layer.combine, layer.route, layer.plan
    b = _Block(graph, layer, k, ep)
    _, _, _, top_k, weights, layout, activation, alpha, limit, group = ep.args
    experts = (weights, layout, activation, alpha, limit)
    route_uses = layer.rules[route].args
    items = {n.args[1]: n for n in plan.users}
    dispatches, pendings = {}, {}

    def dispatch(i):      # pre ops, route, plan, counts + host splits, start the dispatch
        for n in layer.pre:
            b.node(n, i)
        for n in layer.core:
            if n is route:
                args = tuple(b.input(a, route_uses[a], i) if isinstance(a, fx.Node) else a for a in route.args)
                b.chunks[(n, i)] = b.call(chunk_route, args, like=n)
            elif n is plan:
                b.chunks[(n, i)] = b.call(chunk_plan, (b.chunks[(plan.args[0], i)], plan.args[1]), like=n)
            elif n.target is operator.getitem and n.args[0] is plan:
                b.chunks[(n, i)] = b.call(operator.getitem, (b.chunks[(plan, i)], n.args[1]), like=n)
            else:
                b.node(n, i)
        x_i = b.input(layer.x, tl.ArgUse(True, (value(layer.x).shape[1],)), i)
        d = b.call(ep_dispatch, (x_i, b.chunks[(items[1], i)], b.chunks[(items[0], i)], top_k, *experts, group),
                   {**ep.kwargs, "chunk": f"tokens {i + 1}/{k}"}, like=ep)
        d.meta[WHOLE_LAYER] = (value(ep.args[0]), value(ep.args[2]))   # chunks have no example values
        dispatches[i] = b.call(operator.getitem, (d, 0), like=ep)

    def experts_of(i):    # side ops, wait for the rows, experts, start the combine
        for n in layer.side:
            b.node(n, i)
        d = dispatches[i]
        got = b.call(ep_wait, (b.call(operator.getitem, (d, 0), like=ep),), like=ep)
        y = b.call(ep_local_experts, (got, d, *experts), {"site": ep.kwargs.get("site", "")}, like=ep)
        pendings[i] = b.call(ep_combine, (y, d), like=ep)

    def combined(i):      # wait for the rows back, combine, post ops
        rows = b.call(ep_collect, ((dispatches[i],), [b.call(ep_wait, (pendings[i],), like=ep)]), like=ep)
        b.chunks[(combine, i)] = b.call(chunk_combine, (rows, b.chunks[(items[2], i)], b.chunks[(combine.args[2], i)]),
                                        like=combine)
        for n in layer.post:
            b.node(n, i)

    # Each dropless dispatch first syncs the host on its split sizes, and the count exchange
    # queues behind the all-to-alls already started (one communicator): so chunk i+1's dispatch
    # is issued before chunk i's experts, and chunk i's combine is read after chunk i+1's experts,
    # each host sync leaving queued compute (the previous chunk's experts, post ops) to overlap.
    for step in range(k + 2):
        for stage, i in ((dispatch, step), (experts_of, step - 1), (combined, step - 2)):
            if 0 <= i < k:
                stage(i)
    chunked = [*layer.pre, *layer.core, *layer.side, combine, *layer.post]
    _read_outside(b, chunked, {ep, plan, *plan.users}, k)
    _erase(graph, set(chunked) | {ep})
    _reorder(graph, b.nodes)


def _read_outside(b, chunked, skip, k):
    """Nodes outside the block read the concatenation of the chunks, in the original shape."""
    inside = set(chunked) | skip
    for n in chunked:
        outside = [u for u in n.users if u not in inside]
        if not outside or n in skip:
            continue
        whole = b.call(torch.cat, ([b.chunks[(n, i)] for i in range(k)], 0), like=n)
        rest = tuple(b.layer.rules[n].out_rest)
        shape = tuple(value(n).shape)
        flat = (tl.flat_rows(shape, rest, b.layer.T), *rest)
        if len(shape) != len(flat) or not all(statically_known_true(x == y) for x, y in zip(shape, flat)):
            whole = b.call("reshape", (whole, shape), like=n, op="call_method")   # static T only
        whole.meta["example_value"] = value(n)
        for u in outside:
            u.replace_input_with(n, whole)


def _erase(graph, dead):
    """Erase nodes nothing reads any more, readers first."""
    while dead:
        free = [n for n in dead if not n.users]
        if not free:
            raise AssertionError(f"chunk_tokens: still read after chunking: "
                                 f"{[(n.name, [u.name for u in n.users]) for n in dead]}")
        for n in free:
            graph.erase_node(n)
            dead.discard(n)


def _emit_capacity(graph, layer, k):
    """ep_experts -> k pieces of the slots: start every dispatch, then per piece wait, experts,
    start the combine; then wait for the combines and reassemble."""
    ep = layer.ep
    b = _Block(graph, layer, 1, ep)
    x, src, offsets, top_k, weights, layout, activation, alpha, limit, group = ep.args
    experts = (weights, layout, activation, alpha, limit)
    ds = b.call(ep_dispatch, (x, src, offsets, top_k, *experts, group),
                {**ep.kwargs, "pieces": k, "chunk": f"pieces {k}"}, like=ep)
    pendings = []
    for j in range(k):
        d = b.call(operator.getitem, (ds, j), like=ep)
        got = b.call(ep_wait, (b.call(operator.getitem, (d, 0), like=ep),), like=ep)
        y = b.call(ep_local_experts, (got, d, *experts), {"site": ep.kwargs.get("site", "")}, like=ep)
        pendings.append(b.call(ep_combine, (y, d), like=ep))
    backs = [b.call(ep_wait, (p,), like=ep) for p in pendings]
    out = b.call(ep_collect, (ds, backs), like=ep)
    out.meta.update(ep.meta)
    ep.replace_all_uses_with(out)
    graph.erase_node(ep)


def _reorder(graph, block):
    """Nodes the block reads stay before it, nodes that read it move after it; order kept otherwise."""
    inside = set(block)
    after, todo = set(), [u for n in block for u in n.users if u not in inside]
    while todo:
        n = todo.pop()
        if n not in after:
            after.add(n)
            todo.extend(n.users)
    nodes = [n for n in graph.nodes if n.op != "output"]
    order = [n for n in nodes if n not in after and n not in inside] + block + [n for n in nodes if n in after]
    for prev, n in zip(order, order[1:]):
        if prev.next is not n:
            prev.append(n)
