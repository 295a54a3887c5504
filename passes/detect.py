"""Pass `detect`: find the MoE layers in a Dynamo graph.

Expects: a Dynamo FX graph with example values on its nodes and the real example inputs.
Guarantees: returns the graph unchanged and a `DetectReport` whose regions are each proven (by
`identify`) to compute what moec's ops compute, and whose misses each carry a reason.

    for each top-k whose scores come from a linear router (logits = x @ W_r.T, W_r: (E, H)):
        U = everything computed from the top-k (mutations included)
        O = first (T, H) float node that all of U flows through      -> the combined output
        R = U up to O, plus the router's score ops and the buffers only R uses
        weights = R's inputs that are graph inputs with a leading E dimension, and the weights
                  R computes from parameters alone (LoRA's W + s * L @ R), split off R
        identify(R) -> Router, Experts that reproduce O on random tokens, or a Miss

Top-k over anything that is not a router (sampling over vocabulary logits, attention) has no
expert weights behind it and is skipped without a report; a router whose experts moec cannot
rewrite is reported as a miss.
"""
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import computed_weights, identify
from .graph import (TRACED_AS_MARKER, DepGraph, common_module, gathered_dtensor, is_tensor, module_path, op_name,
                    hint, is_int, shape, source_location, static, value)
from .region import DetectReport, Miss, Region

_ANCHORS = {"topk", "max", "argmax"}
# Ops allowed between the router linear and its top-k when walking back from the top-k.
_SCORE_WALK_DEPTH = 12
# A top-k over more outputs than this whose result leaves the graph is taken for sampling, not routing.
_MAX_EXPERTS = 1024


class _NotMoE(Exception):
    """The candidate is not an MoE router (no expert weights behind it)."""


class _Missed(Exception):
    def __init__(self, reason, node=None, kind="unproven"):
        super().__init__(reason)
        self.reason, self.node, self.kind = reason, node, kind


def detect(gm: fx.GraphModule, ctx) -> tuple:
    report = DetectReport()
    for path, sub, real in nested_graphs(gm, _real_inputs(gm, ctx.example_inputs)):
        _detect_in(sub, path, real, report)
    return gm, report


def _detect_in(gm, path, real, report):
    """Regions and misses of one graph: the root, or a higher-order op's body (a checkpointed layer)."""
    dg = DepGraph.build(gm.graph)
    claimed, routers = set(), set()
    for anchor in [n for n in gm.graph.nodes if op_name(n) in _ANCHORS]:
        linear = None if anchor in claimed else _router_linear(anchor, real)
        # One router, one decision: grouped top-k (DeepSeek) ranks the same logits several times.
        if linear is None or linear in routers:
            continue
        routers.add(linear)
        num_experts = hint(shape(linear)[-1])      # for a miss's report: no guard for a look-alike
        try:
            region = _analyse(gm, dg, anchor, linear, real)
        except _NotMoE:
            continue
        except _Missed as m:
            where = source_location(m.node or anchor)
            report.misses.append(Miss(module=_block_path([anchor]), reason=m.reason, where=where,
                                      num_experts=num_experts, top_k=_k_of(anchor), kind=m.kind))
            continue
        region.graph = path
        report.regions.append(region)
        claimed |= set(region.nodes)


def nested_graphs(gm, real, path=""):
    """(path, GraphModule, real inputs) for `gm` and, depth first, every higher-order op body in
    it (torch.utils.checkpoint's tag_activation_checkpoint, invoke_subgraph, ...): a body's
    placeholders are the op's operands, so the real tensors behind them carry over."""
    yield path, gm, real
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        bodies = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op == "get_attr"
                  and isinstance(getattr(gm, a.target, None), fx.GraphModule)]
        if len(bodies) != 1:
            continue   # control flow (cond, while_loop) holds several bodies: not a layer wrapper
        attr = node.args[bodies[0]].target
        body = getattr(gm, attr)
        operands = [a for a in node.args[bodies[0] + 1:] if isinstance(a, fx.Node)]
        holders = [n for n in body.graph.nodes if n.op == "placeholder"]
        if len(operands) != len(holders):
            continue
        body_real = {h: real[o] for h, o in zip(holders, operands) if o in real}
        yield from nested_graphs(body, body_real, f"{path}.{attr}" if path else attr)


def _analyse(gm, dg, anchor, linear, real):
    logits = linear
    tokens = shape(logits)[0]
    hidden = static(shape(_router_operands(linear)[0])[-1])
    num_experts = static(shape(logits)[-1])

    computed = dg.forward_slice([anchor])
    output = _combine_point(dg, computed, tokens, hidden, logits, real, num_experts)
    if output is None:
        leaves = any(u.op == "output" for n in computed for u in dg.users[n])
        if _expert_weight_inputs(_data_inputs(dg, computed), real, num_experts) or \
                (leaves and num_experts <= _MAX_EXPERTS):
            raise _Missed("the expert outputs never merge into one (tokens, hidden) tensor inside this "
                          "graph: a graph break splits the layer", kind="graph_break")
        raise _NotMoE()
    score_ops = (dg.backward_slice([anchor], stop={logits}) & dg.forward_slice([logits])) - {logits}
    nodes = ((computed & dg.backward_slice([output])) | score_ops | {output})
    router_side = dg.backward_slice([linear])
    nodes |= _private_helpers(dg, nodes, dg.backward_slice([output]) - router_side)
    nodes |= _assertion_tails(dg, nodes)
    aliases = _output_aliases(dg, output)
    nodes |= aliases

    inputs = _data_inputs(dg, nodes)
    # Before any miss is raised: a look-alike (argmax over a codebook) must not be reported.
    if not _expert_weight_inputs(inputs, real, num_experts):
        if _per_expert_modules(inputs, real, num_experts):
            lora = ("; each has its own LoRA adapters (PEFT target_modules on per-expert Linear layers), "
                    "and moec fuses LoRA on stacked weights: put it on the 3D parameters with "
                    "LoraConfig(target_parameters=[...])" if _per_expert_lora(inputs, real, num_experts) else "")
            raise _Missed(f"the {num_experts} experts are separate modules (an nn.ModuleList of nn.Linear), "
                          "not stacked (E, ...) weights: moec's grouped kernels read stacked weights and "
                          "never copy parameters per step. Store the experts as 3D parameters (as Hugging "
                          f"Face's MoE layers do) to have this layer fused{lora}", output)
        raise _NotMoE()
    # The tokens may be a real graph input too (the block's own argument): find them first.
    x = _token_input(dg, inputs - {logits}, router_side, hidden)
    # weights the graph computes (LoRA's W + s * L @ R) stay in the graph and enter as inputs
    nodes, computed, producers = computed_weights.split_producers(gm, dg, nodes, x, logits, real)
    if producers:
        real = {**real, **computed}
        inputs = _data_inputs(dg, nodes)
    # a LoRA weight only the layer reads is computed as factors beside the GEMMs: the merged
    # weight goes with the region (one read elsewhere too stays, and is read as it is)
    lora = {f.weight: f for f in map(computed_weights.lora_form, producers)
            if f is not None and all(dg.users[n] <= nodes | f.nodes for n in f.nodes)}
    weights = {i for i in inputs if i in real} - {x}
    expert_side = dg.forward_slice({x} | weights, stop={logits}) & nodes
    kept = _router_outputs_kept(dg, nodes, expert_side, aliases | {output})
    for i in inputs - weights - {logits, x}:
        if is_tensor(i):
            raise _Missed(f"the layer reads `{i.name}` ({tuple(shape(i))}), computed outside it; "
                          "moec's ops take only the tokens, the router logits and weights", i)
    ordered = dg.sorted(nodes)
    try:
        router, experts, bias, check = identify.identify(
            gm, dg, ordered, dg.sorted(inputs), output, x=x, logits=logits, real=real,
            num_experts=num_experts, hidden=hidden, lora=lora)
    except identify.Unproven as e:
        raise _Missed(str(e), output) from None
    read = {spec[0] for spec in (experts.up, experts.gate, experts.down) if spec is not None}
    merging = {n for w, f in lora.items() if w not in read for n in f.nodes}
    ordered = dg.sorted(nodes | merging)     # the merged LoRA weights: the rewrite no longer reads them
    if isinstance(router.capacity, fx.Node):   # a symbolic capacity: the rewrite still reads it
        kept |= dg.backward_slice([router.capacity]) & nodes
    return Region(module=_block_path(ordered), idiom=_idiom(ordered), router=router, experts=experts,
                  x=x, logits=logits, score_bias=bias, output=output, nodes=ordered, check=check,
                  kept=frozenset(kept), aliases=frozenset(aliases))


def _router_linear(anchor, real):
    """The router product whose output the top-k ranks: `linear(x, W)` with W (E, H), or
    `x @ W.t()` / `x @ W` (W (E, H) transposed, or stored (H, E)) / `einsum` as code without
    nn.Linear writes it, if W is a graph input; with its bias add (`_with_bias`). Its tokens:
    `_router_operands`."""
    todo, seen = [(anchor, 0)], set()
    while todo:
        node, depth = todo.pop(0)
        if node in seen or depth > _SCORE_WALK_DEPTH:
            continue
        seen.add(node)
        if op_name(node) in _ROUTER_PRODUCTS and node is not anchor:
            return _with_bias(node, real) if _reads_router_weight(node, real) else None
        if op_name(node) in ("bmm", "grouped_mm"):
            return None
        todo.extend((a, depth + 1) for a in node.all_input_nodes)
    return None


_ROUTER_PRODUCTS = ("linear", "matmul", "mm", "einsum")


def _reads_router_weight(product, real):
    """Whether a product of _ROUTER_PRODUCTS multiplies the tokens by a 2D weight graph input."""
    name = op_name(product)
    if name == "linear":
        return _is_weight(_strip_casts(product.args[1]), real)
    if name == "einsum":
        return _einsum_router(product, real)
    return len(product.args) == 2 and _is_weight(_strip_transpose(product.args[1]), real)


def _with_bias(product, real):
    """`product + b` where the product's one use adds a bias vector (E,) that is a graph input
    (`x @ W.T + b`, GPT-OSS's router written without nn.Linear): the logits are the sum, and the
    bias stays outside the layer as nn.Linear's does (inside, its gradient would be lost)."""
    users = list(product.users)
    if len(users) != 1 or op_name(users[0]) != "add" or len(users[0].args) != 2:
        return product
    other = _strip_casts(users[0].args[1] if users[0].args[0] is product else users[0].args[0])
    s, e = shape(other), shape(product)
    is_bias = other in real and s is not None and len(s) == 1 and e is not None and s[0] == e[-1]
    return users[0] if is_bias else product


def _router_operands(node):
    """(tokens, weight) of a router product: linear / matmul's first two arguments, einsum's
    operands; through a bias add (`_with_bias`) to its product."""
    if op_name(node) == "add":
        node = next(a for a in node.args if isinstance(a, fx.Node) and op_name(a) in _ROUTER_PRODUCTS)
    if op_name(node) != "einsum":
        return tuple(node.args[:2])
    ops = node.args[1:]
    return tuple(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else tuple(ops)


def _einsum_router(node, real):
    """`einsum("th,eh->te", x, W)` (or "th,he->te"): two 2D operands sharing one contracted
    letter, the second a weight graph input, the tokens' letter first in the result."""
    eq, ops = node.args[0], _router_operands(node)
    if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq or "." in eq:
        return False
    ins, out = eq.replace(" ", "").split("->")
    a, b = (ins.split(",") + [""])[:2]
    shared = set(a) & set(b)
    return (len(a) == len(b) == len(out) == 2 and len(shared) == 1 and out[0] == (set(a) - shared).pop()
            and out[1] == (set(b) - shared).pop() and _is_weight(_strip_casts(ops[1]), real))


def _is_weight(w, real):
    s = shape(w)
    return w in real and s is not None and len(s) == 2


def _strip_casts(node):
    while isinstance(node, fx.Node) and op_name(node) in ("type", "to", "float", "half", "bfloat16"):
        node = node.args[0]
    return node


def _strip_transpose(node):
    """W behind `W.t()`, `W.T`, `W.transpose(0, 1)`, `W.permute(1, 0)` and casts."""
    node = _strip_casts(node)
    while isinstance(node, fx.Node) and (op_name(node) in ("t", "transpose", "permute")
                                         or op_name(node) == "getattr" and node.args[1:] in (("T",), ("mT",))):
        node = _strip_casts(node.args[0])
    return node


def _combine_point(dg, computed, tokens, hidden, logits, real, num_experts):
    """First node of `computed` that every later use of `computed` depends on, shaped (T, H),
    that reads the expert weights if the graph has any: with E == H or G == H a routing tensor
    (dense one-hot weights (T, E), DeepSeek's group mask (T, G)) is (T, H)-shaped too."""
    router_side = dg.backward_slice([logits])
    # the tokens' own ancestors are no expert weights: a batched input (B, S, H) with B == E is 3D
    stacks = _expert_weight_candidates(real, num_experts) - router_side
    remaining = {n: len(dg.users[n] & computed) for n in computed}
    live = set()
    for n in dg.sorted(computed):
        for d in dg.deps[n] & computed:
            remaining[d] -= 1
            if remaining[d] == 0:
                live.discard(d)
        if remaining[n]:
            live.add(n)
        # A layer whose result only the graph's output reads (no users in `computed`) ends there.
        ends_graph = not live and any(u.op == "output" for u in dg.users[n])
        if (live == {n} or ends_graph) and _is_token_shaped(n, tokens, hidden) and \
                _reads_experts(dg, n, stacks, logits, router_side):
            return n
    return None


def _reads_experts(dg, node, stacks, logits, router_side) -> bool:
    """Whether `node` can be the layer's output: it reads the expert weights; where the graph holds
    none (a graph break left them in the next graph), it reads the tokens other than through the
    logits, as every expert does and no routing tensor (a grouped router's masked scores) does."""
    if stacks:
        return bool(stacks & dg.backward_slice([node], stop=router_side))
    return bool(dg.backward_slice([node], stop={logits}) & router_side)


def _expert_weight_candidates(real, num_experts) -> set:
    """Graph inputs that may be the experts' weights: (E, ...) stacks, or else E matrices of one
    shape (per-expert modules: reported as a miss later, but their output must be found first,
    or a grouped router's masked scores (T, E) pass for it when E == H and the layer goes
    unreported)."""
    stacks = {i for i, t in real.items() if t.dim() == 3 and t.shape[0] == num_experts}
    if stacks:
        return stacks
    shapes = [tuple(t.shape) for t in real.values() if t.dim() == 2]
    return {i for i, t in real.items() if t.dim() == 2 and shapes.count(tuple(t.shape)) >= num_experts}


def _is_token_shaped(node, tokens, hidden):
    v = value(node)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 2:
        return False
    return _same(v.shape[0], tokens) and _same_width(v.shape[1], hidden)


def _same_width(width, hidden) -> bool:
    """Whether a (T, width) tensor is as wide as the tokens (`hidden`: static, see graph.static).
    A width Dynamo made symbolic apart from the tokens' (an int config attribute that changed
    between compiles) is specialised where its traced value matches: a layer's output is as wide
    as its input at every width it runs at."""
    if _same(width, hidden):
        return True
    if hint(width) != hidden:
        return False
    static(width)       # guards width == hidden
    return True


def _same(a, b) -> bool:
    return statically_known_true(a == b)


def _private_helpers(dg, nodes, candidates):
    """Nodes that only feed the region (zeros buffers, aranges): the rewrite removes them too."""
    extra = set()
    for n in sorted(candidates - nodes, key=dg.order.__getitem__, reverse=True):
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        users = dg.users[n]
        if users and users <= (nodes | extra):
            extra.add(n)
    return extra


def _assertion_tails(dg, nodes):
    """Dynamo's runtime checks on the layer's data-dependent sizes (`where[0]` -> `sym_size` ->
    comparison -> `_assert_scalar`), and unused values: they read region nodes and lead only to
    assertions or nowhere, so they go with the region."""
    tails = set()
    reached = dg.forward_slice(nodes)
    for n in sorted(reached - nodes, key=dg.order.__getitem__, reverse=True):
        if n in dg.mutations:
            # an in-place write into a buffer the layer made, read by nobody after it (Hugging Face's
            # grouped_mm clamps its sorted ids in place on CUDA): dead with the layer
            if not dg.users[n] and dg.root[n].op == "call_function" and dg.root[n] in reached:
                tails.add(n)
            continue
        if n.op not in ("call_function", "call_method"):
            continue
        users = dg.users[n]
        # dead ends too: higher-order op bodies keep unused getitems (`topk(...)[0]`) Dynamo made
        if (users and users <= tails) or (not users and (op_name(n) in _ASSERTS or not n.is_impure())):
            tails.add(n)
    kept = set()
    # the graph's size inputs, which a check may compare with (`sym_size(h, 1) <= s16` where a
    # width is symbolic): read by anyone, owned by no layer
    sizes = {d for n in tails for d in dg.deps[n] if d.op == "placeholder" and is_int(d)}
    for n in dg.sorted(tails):   # only chains that start in this layer, not in a later one
        if dg.deps[n] <= (nodes | kept | sizes):
            kept.add(n)
    for n in reversed(dg.sorted(kept)):
        if not dg.users[n] <= kept:
            kept.discard(n)
    return kept


_ASSERTS = {"_assert_scalar", "_assert_async", "_check", "_check_is_size", "sym_constrain_range_for_size"}


def _output_aliases(dg, output):
    """Nodes that share the output's storage and shape. A layer that accumulates in place
    (`out = zeros_like(x); out.index_add_(...)`) is read afterwards through the buffer, not
    through its last write: the buffer stands for the result too."""
    base = dg.root[output]
    if base is output:
        return set()
    if base.op == "placeholder":
        raise _Missed(f"the layer writes its result into its input `{base.name}` in place; moec "
                      "rewrites layers that return a new tensor", output)
    return {n for n in dg.backward_slice([output]) if dg.root.get(n) is base and n is not output
            and shape(n) == shape(output)}


def _router_outputs_kept(dg, nodes, expert_side, results):
    """Region nodes the rest of the graph also reads. Router results (scores returned for an
    auxiliary loss, say) may escape: they stay in the graph with what they need. Expert-side
    values may not: moec's ops do not expose them."""
    escapes = []
    for n in dg.sorted(nodes):
        outside = [u for u in dg.users[n] if u not in nodes]
        if n in results or not outside:
            continue
        if n in expert_side:
            raise _Missed(f"`{n.name}`, computed inside the MoE layer, is also used outside it "
                          f"(by `{outside[0].name}`); moec rewrites only self-contained layers", n)
        escapes.append(n)
    return dg.backward_slice(escapes) & nodes


def _data_inputs(dg, nodes) -> set:
    """What `nodes` read from outside them. A write they depend on only for its order (they read a
    view of the buffer it wrote, made after it: a second layer reading the first one's
    `index_add_` buffer) is no input: the view carries its value, and counting the write too gave
    the layer two candidates for its tokens, one of them then reported as read from outside."""
    inputs = {d for n in nodes for d in dg.deps[n]} - nodes
    read = {a for n in nodes for a in n.all_input_nodes}
    return {i for i in inputs if i in read or i not in dg.mutations
            or not any(j in read and dg.root.get(j) is dg.root.get(i) for j in inputs if j is not i)}


def _token_input(dg, candidates, router_side, hidden):
    """The tokens the experts read: a float (..., H) input that is, or is a view of, a tensor the
    router also reads (routers often take their own view or cast of the same hidden states)."""
    found = [c for c in candidates if is_tensor(c) and shape(c)[-1] == hidden and value(c).is_floating_point()
             and (c in router_side or dg.root.get(c, c) in router_side)]
    if not found:
        raise _Missed("could not find the tokens the experts read among the layer's inputs")
    return max(found, key=lambda c: (len(shape(c)) == 2, c in router_side))


def _expert_weight_inputs(inputs, real, num_experts):
    return [i for i in inputs if i in real and real[i].dim() == 3 and real[i].shape[0] == num_experts]


def _per_expert_modules(inputs, real, num_experts) -> bool:
    """At least E matrices of one shape among the layer's inputs: one weight per expert module."""
    shapes = [tuple(real[i].shape) for i in inputs if i in real and real[i].dim() == 2]
    return any(shapes.count(s) >= num_experts for s in set(shapes))


def _per_expert_lora(inputs, real, num_experts) -> bool:
    """Per-expert (N, K) weights with (r, K) and (N, r) companions, r smaller than N and K, each at
    least E times: a LoRA adapter on every expert's Linear."""
    shapes = [tuple(real[i].shape) for i in inputs if i in real and real[i].dim() == 2]
    common = {s for s in set(shapes) if shapes.count(s) >= num_experts}
    return any((r, K) in common and (N, r) in common and r < min(N, K) for N, K in common for r, _ in common)


def _real_inputs(gm, example_inputs) -> dict:
    """Graph input node -> the real tensor behind it (parameters, buffers, activations)."""
    real = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, v in zip(placeholders, example_inputs):
        if isinstance(v, torch.Tensor):
            real[node] = v
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            v = _get_attr(gm, node.target)
            if isinstance(v, torch.Tensor):
                real[node] = v
        elif gathered_dtensor(node) in real:
            real[node] = _stand_in(real[gathered_dtensor(node)])
    return real


def _stand_in(dt):
    """Values for a sharded weight gathered in the graph: its other shards live on other ranks and
    a proof needs only values of its shape and scale, so seeded random ones (the same on every
    rank) stand in; no collective runs at compile time."""
    local = dt.to_local().detach()
    scale = float(local.std()) if local.numel() > 1 else 0.0
    g = torch.Generator().manual_seed(0)
    return (torch.randn(dt.shape, generator=g, dtype=local.dtype) * (scale or 1.0)).to(local.device)


def _get_attr(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _k_of(anchor) -> int:
    if op_name(anchor) != "topk":
        return 1
    k = anchor.args[1] if len(anchor.args) > 1 else anchor.kwargs.get("k", 0)
    return k if isinstance(k, int) else 0


def _block_path(nodes) -> str:
    parts = common_module([module_path(n) for n in nodes]).split(".")
    # the router and the experts are children of the block: name the block itself.
    if parts[-1] in ("experts", "gate", "router"):
        parts = parts[:-1]
    return ".".join(parts)


def _idiom(nodes) -> str:
    if any(TRACED_AS_MARKER in (n.meta.get("stack_trace") or "") for n in nodes):
        return f"hf_eager_loop (traced as {_structural_idiom(nodes)})"
    return _structural_idiom(nodes)


def _structural_idiom(nodes) -> str:
    names = {op_name(n) for n in nodes}
    if names & {"grouped_mm", "_grouped_mm", "grouped_mm_fallback"}:
        return "grouped_mm"
    if "bmm" in names:
        return "batched_mm"
    if "einsum" in names:
        return "einsum"
    if names & {"index_add_", "index_add", "index_put_", "setitem", "where", "nonzero"}:
        return "expert_loop"
    return "other"
