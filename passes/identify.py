"""Which known MoE semantics a detected region computes, proven on random inputs.

Structure narrows the choice (which ops appear, which inputs have a leading E dimension), but
details like "is gate/up concatenated or interleaved", "is the weight stored transposed", "is
the top-k renormalised" are read most reliably off the numbers. So: enumerate the few router
and expert forms the structure allows, run the user's region once on random tokens and random
logits with the real weights (float64 where the region's ops allow it), and keep the form whose
`torch.ops.moec.*` result matches. A region no form reproduces is a miss, never a guess.
"""
import dataclasses
import itertools
import operator

import torch
import torch.fx as fx

from moec.codegen import layout as layouts
from moec.codegen import reference
from moec.codegen.errors import MoecKernelError

from .capacity import capacity_routers, find_capacity, selections
from .graph import hint, op_name, shape, value
from .region import Experts, Router

_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")


class Unproven(Exception):
    """No known form reproduces the region; the message says what was tried."""


def identify(gm, dg, nodes, inputs, output, *, x, logits, real, num_experts, hidden, lora=None):
    """lora: {weight input: computed_weights.LoraForm} for weights the graph computes as
    W + s * L @ R: roles reading them are proven, and recorded, as W with the factors beside."""
    tokens = hint(shape(logits)[0])
    if tokens == 0:
        raise Unproven("compiled with zero tokens, so the rewrite cannot be checked; "
                       "moec decides on the first non-empty batch")
    node_set = set(nodes)
    seeds = {x} | {i for i in inputs if i in real and real[i].dim() >= 2}
    tainted = dg.forward_slice(seeds, stop={logits}) & node_set
    router_nodes = [n for n in nodes if n not in tainted]
    bias = _score_bias(router_nodes, inputs, real, num_experts)
    gen = torch.Generator().manual_seed(0)
    # the score bias is proven on random values, not the layer's: training moves it, and at its
    # initial zeros ways of using it that differ later (which dropped experts a grouped router
    # can still choose) give the same routing
    probe = {bias: _randn((num_experts,), gen, bias) * 0.1} if bias is not None else {}

    # A capacity gate's routing is only visible through the layer's output (dropped copies change
    # it), so its router forms are proven jointly with the experts, after the dropless ones.
    routers, unproven = [], None
    try:
        ids, weights, top_k = _router_outputs(router_nodes, tokens)
        routers.append(_prove_router(gm, dg, nodes, node_set, inputs, ids, weights, top_k, bias, probe, logits,
                                     real, num_experts, tokens, gen))
    except Unproven as e:
        unproven = e
    cap = find_capacity(nodes)
    if cap is not None and selections(router_nodes):
        routers += capacity_routers(router_nodes, cap, selections(router_nodes))
    if not routers:
        raise unproven
    dtype, eps = _score_dtype(router_nodes, logits), _renorm_eps(router_nodes)
    routers = [dataclasses.replace(r, score_dtype=dtype, renorm_eps=eps) for r in routers]
    router, experts, check = _prove_experts(gm, nodes, inputs, output, x, logits, real, routers, bias, probe,
                                            num_experts, hidden, tokens, gen, lora or {})
    return router, experts, bias, check


# ---------------------------------------------------------------------------------- router


def _router_outputs(router_nodes, tokens):
    selects = [n for n in router_nodes if op_name(n) in ("topk", "max", "argmax")]
    if not selects:
        raise Unproven("no top-k over the router scores")
    last = selects[-1]
    k = 1 if op_name(last) != "topk" else (last.args[1] if len(last.args) > 1 else last.kwargs["k"])
    ids = last if op_name(last) == "argmax" else next(
        (u for u in last.users if op_name(u) == "getitem" and u.args[1] == 1), None)
    if ids is None or not isinstance(k, int):
        raise Unproven("the top-k's expert ids are not used")
    # A mask loop's `w * (ids == e)`, when E == k dense one-hot weights `(one_hot(ids) * w[..., None]).sum(1)`,
    # and when k == 1 the weights in expert order `w.reshape(-1)[argsort(ids)]` are (T, k)-shaped
    # too, but they are dispatch, not routing.
    per_expert = set()
    for n in router_nodes:
        if op_name(n) in ("eq", "one_hot", "argsort", "sort") or any(a in per_expert for a in n.all_input_nodes):
            per_expert.add(n)
    floats = [n for n in router_nodes if isinstance(value(n), torch.Tensor) and value(n).is_floating_point()
              and _hint_shape(n) in ((tokens, k),) + (((tokens,),) if k == 1 else ()) and n not in per_expert]
    if not floats:
        raise Unproven("no (tokens, k) routing weights found after the top-k")
    return ids, floats[-1], k


def _score_dtype(router_nodes, logits):
    """The dtype the user's code scores in (`softmax(logits, dtype=torch.float)` in a float64
    model scores in float32): moec scores in the same one, so the same experts win."""
    for n in router_nodes:
        if op_name(n) in ("softmax", "sigmoid", "log_softmax"):
            return value(n).dtype
    return value(logits).dtype


def _renorm_eps(router_nodes) -> float:
    """The constant the router adds to the sum it divides by (DeepSeek: 1e-20); 0.0 if none."""
    sums = {n for n in router_nodes if op_name(n) == "sum"}
    for n in router_nodes:
        if op_name(n) in ("add", "iadd") and len(n.args) == 2:
            a, b = n.args
            if isinstance(b, float) and a in sums:
                return b
            if isinstance(a, float) and b in sums:
                return a
    return 0.0


def _score_bias(router_nodes, inputs, real, num_experts):
    used = {d for n in router_nodes for d in n.all_input_nodes}
    cands = [i for i in inputs if i in used and i in real and real[i].dim() == 1
             and real[i].shape[0] == num_experts]
    if len(cands) > 1:
        raise Unproven(f"the router adds {len(cands)} per-expert vectors to its scores; moec knows one")
    return cands[0] if cands else None


def _prove_router(gm, dg, nodes, node_set, inputs, ids, weights, top_k, bias, probe, logits, real, num_experts,
                  tokens, gen):
    needed = dg.backward_slice([ids, weights]) & node_set
    sub_nodes = [n for n in nodes if n in needed]
    sub_inputs = [i for i in inputs if any(i in dg.deps[n] for n in sub_nodes)]
    fn = _extract(gm, sub_nodes, sub_inputs, [weights, ids])
    logit_values = _randn((tokens, num_experts), gen, logits) * 2
    args = _args(sub_inputs, {logits: logit_values, **probe}, real, torch.float64)
    ref_w, ref_ids = fn(*args)
    ref_w, ref_ids = ref_w.reshape(tokens, top_k), ref_ids.reshape(tokens, top_k)
    names = {op_name(n) for n in sub_nodes}
    bias_value = probe.get(bias)
    tried = []
    for router in _router_candidates(sub_nodes, names, top_k, num_experts):
        tried.append(router.kind)
        try:
            w, i = torch.ops.moec.route(logit_values, bias_value, router.top_k, router.scoring, router.renormalize,
                                        router.scale, router.n_group, router.topk_group, router.group_fill)
        except MoecKernelError:     # a form these widths cannot take (too few experts in the kept groups)
            continue
        if _same_routing(w, i, ref_w.double(), ref_ids, _coarsest(sub_nodes), _tied(router, logit_values, bias_value)):
            return router
    raise Unproven(f"the router matches none of moec's routers (tried {sorted(set(tried))} with and "
                   f"without renormalisation)")


def _router_candidates(sub_nodes, names, top_k, num_experts):
    if "sigmoid" in names:
        scorings = ["sigmoid"]
    elif "softmax" in names:
        after = _softmax_after_topk(sub_nodes)
        scorings = ["softmax_after_topk", "softmax"] if after else ["softmax", "softmax_after_topk"]
    else:
        return []
    topks = [n for n in sub_nodes if op_name(n) == "topk"]
    groups = [(1, 1)]
    if len(topks) >= 3:
        first_in = _hint_shape(topks[0].args[0])
        second_k = topks[1].args[1] if len(topks[1].args) > 1 else topks[1].kwargs.get("k")
        if len(first_in) == 3 and isinstance(second_k, int):
            groups.insert(0, (first_in[1], second_k))
    renorms = [True, False] if names & {"sum"} else [False, True]
    scales = _float_constants(sub_nodes, (operator.mul, "mul")) + [1.0]
    for scoring, (g, tg), renorm, scale in itertools.product(scorings, groups, renorms, scales):
        for fill in _group_fills(sub_nodes) if g > 1 else (None,):
            yield Router(scoring=scoring, top_k=top_k, renormalize=renorm, scale=scale, n_group=g, topk_group=tg,
                         group_fill=fill)


def _group_fills(sub_nodes):
    """What a grouped router scores the dropped groups' experts: the constant its masked_fill /
    where writes, or 0 where it multiplies by the mask (transformers before 5.2x: 0.0; DeepSeek's
    and vLLM's code, transformers 5.25: -inf, which moec spells None), tried first, then the other:
    the two choose differently only where fewer than k kept experts score above the fill, which
    the proof's logits may not reach (a zero score bias), and there the first one found wins."""
    found, masks = [], set()
    for n in sub_nodes:
        if op_name(n) in ("scatter", "scatter_") or any(a in masks for a in n.all_input_nodes):
            masks.add(n)    # the group mask and what is made from it (scatter_ writes into its input)
            if op_name(n) == "scatter_" and isinstance(n.args[0], fx.Node):
                masks.add(n.args[0])
        if op_name(n) in ("masked_fill", "masked_fill_") and len(n.args) > 2:
            found.append(n.args[2])
        elif op_name(n) == "where" and len(n.args) == 3:
            found += [a for a in n.args[1:] if isinstance(a, (int, float))]
        elif op_name(n) in ("mul", "mul_") and len([a for a in n.args if a in masks]) == 1 \
                and all(isinstance(a, fx.Node) for a in n.args):
            found.append(0.0)     # scores * mask: the dropped score 0
    fills = [None if f == float("-inf") else float(f) for f in found if isinstance(f, (int, float))]
    return list(dict.fromkeys(fills + [None, 0.0]))


def _softmax_after_topk(sub_nodes):
    seen_topk = False
    for n in sub_nodes:
        seen_topk |= op_name(n) == "topk"
        if op_name(n) == "softmax":
            return seen_topk
    return False


def _same_routing(w, ids, ref_w, ref_ids, dtype, tied=None):
    """tied: (choice (T, E), rows (T,) bool) where the k-th best choice ties the next: which of the
    tied experts torch.topk takes is unspecified (it differs by device), so there the chosen
    scores must agree, not the experts or their weights."""
    ref_ids = ref_ids.long()
    if tied is not None:
        choice, rows = tied
        picked = lambda i: choice[rows].gather(-1, i[rows]).sort(-1)[0]
        if not torch.equal(picked(ids), picked(ref_ids)):
            return False
        keep = ~rows
        w, ids, ref_w, ref_ids = w[keep], ids[keep], ref_w[keep], ref_ids[keep]
    # Expert order within a token is unspecified (topk(sorted=False)): compare sorted by id.
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    if not torch.equal(ids.gather(-1, order), ref_ids.gather(-1, ref_order)):
        return False
    tol = _TOLERANCE[dtype]
    return torch.allclose(w.double().gather(-1, order), ref_w.gather(-1, ref_order), rtol=tol, atol=tol * 1e-2)


def _untied(logits, routers, bias, gen, tries=8):
    """logits with the rows where a router's k-th choice ties the next drawn again: the layer's
    output there depends on torch.topk's unspecified order among the tied."""
    for _ in range(tries):
        rows = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        for r in routers:
            t = _tied(r, logits, None if bias is None else bias.to(logits.device))
            if t is not None:
                rows |= t[1]
        if not rows.any():
            break
        logits = logits.clone()
        logits[rows] = torch.randn((int(rows.sum()), logits.shape[1]), generator=gen,
                                   dtype=torch.float64).to(logits.device) * 2
    return logits


def _tied(router, logits, bias):
    """(choice scores, rows whose k-th and next best tie) under `router`; None where no row ties."""
    choice = reference.route_choice(logits, bias, router.scoring, router.n_group, router.topk_group,
                                    router.group_fill)
    if router.top_k >= choice.shape[1]:
        return None
    top = choice.topk(router.top_k + 1, dim=-1)[0]
    rows = top[:, -1] == top[:, -2]
    return (choice, rows) if rows.any() else None


def _coarsest(nodes):
    """The least precise float dtype the user's code rounds to (`weights.to(hidden.dtype)` in a
    bf16 model rounds the routing weights even when the proof runs in float64)."""
    found = {value(n).dtype for n in nodes if isinstance(value(n), torch.Tensor) and value(n).is_floating_point()}
    return max(found, key=lambda d: _TOLERANCE[d], default=torch.float64)


# ---------------------------------------------------------------------------------- experts


def _prove_experts(gm, nodes, inputs, output, x, logits, real, routers, bias, probe, num_experts, hidden,
                   tokens, gen, lora):
    """The first (router, experts) pair whose moec ops reproduce the layer on random tokens.
    LoRA weights get random base and factors (a zero-initialised B would hide wrong factors):
    the layer reads their merged value, moec's ops the factors."""
    fn = _extract(gm, nodes, inputs, [output])
    # 0-d inputs are scalars the graph lifted (a capacity factor), not expert weights
    weights = [i for i in inputs if i in real and i is not bias and i is not x and real[i].dim() > 0]
    names = {op_name(n) for n in nodes}
    candidates = list(_expert_candidates(nodes, weights, real, num_experts, hidden, names))
    if not candidates:
        shapes = ", ".join(f"{w.name}{tuple(real[w].shape)}" for w in weights)
        raise Unproven(f"expert weights of unknown layout: {shapes}")
    logit_values = _untied(_randn((tokens, num_experts), gen, logits) * 2, routers, probe.get(bias), gen)
    x_shape = _hint_shape(x)
    # float64 makes the proof sharp; torch._grouped_mm has no float64 kernel, and a float64 copy
    # of a large layer's experts is a compile-time peak users pay in memory (4.8 GB for a
    # Qwen3-30B-A3B layer, 11 GB for Mixtral-8x7B's): those prove in the model's dtype.
    wide = sum(real[w].numel() for w in weights) * 8 > PROOF_FLOAT64_BYTES
    dtypes = (value(x).dtype,) if wide or names & {"_grouped_mm", "grouped_mm"} else (torch.float64, value(x).dtype)
    for dtype in dtypes:
        x_values = _randn(x_shape, gen, x).to(dtype)
        factors = _lora_values(lora, gen, dtype)
        given = {x: x_values, logits: logit_values.to(dtype), **{w: factors[w] for w in lora},
                 **{b: v.to(dtype) for b, v in probe.items()}}
        args = _args(inputs, given, real, dtype)
        try:
            ref = fn(*args)[0].double().reshape(tokens, hidden)
        except Exception as e:  # an op without a float64 kernel: prove in the model's dtype
            if dtype is torch.float64:
                continue
            raise Unproven(f"running the layer on random tokens failed: {e}") from None
        env = {**dict(zip(inputs, args)), **factors}
        x2d = env[x].to(dtype).reshape(tokens, hidden)
        # a bf16 model rounds inside the layer even when the proof feeds it float64
        tol = max(_TOLERANCE[dtype], _TOLERANCE[_coarsest(nodes)])
        best = float("inf")
        for router in routers:
            w, ids = route_with_capacity(router, env[logits].double(), _double(env.get(bias)), num_experts)
            w = w if dtype is torch.float64 else w.float()      # as moec.route gives it for the model
            tied = _tied(router, env[logits].double(), _double(env.get(bias)))
            rows = ~tied[1] if tied is not None else slice(None)    # left tied after _untied's draws
            if tied is not None and not rows.any():
                continue
            used, ids = _touched(ids, num_experts)
            offsets, src, inv = torch.ops.moec.plan(ids, used.numel())
            for experts in map(lambda c: _with_lora(c, lora), candidates):
                y = torch.ops.moec.experts(x2d, src, offsets, router.top_k,
                                           *_weight_args(experts, env, used, dtype), experts.activation,
                                           experts.alpha, experts.limit)
                out = torch.ops.moec.combine(y, inv, w).double()
                err = ((out[rows] - ref[rows]).norm() / ref[rows].norm().clamp_min(1e-30)).item()
                best = min(best, err)
                if err <= tol:
                    lora = [p for p, f in zip(layouts.PROJECTIONS, experts.lora) if f is not None]
                    return router, experts, (f"matched on {tokens} random tokens in {str(dtype)[6:]} "
                                             f"(rel. err {err:.1e})" +
                                             (f"; LoRA on {', '.join(lora)} as factors" if lora else ""))
        kinds = sorted({r.kind for r in routers})
        raise Unproven(f"no known expert form reproduces the layer ({len(candidates)} expert forms x "
                       f"routers {kinds} tried, best relative error {best:.1e})")
    raise Unproven("the layer could not be run on random tokens")


def route_with_capacity(router, logits, bias, num_experts):
    """moec's routing for `router` in plain calls: what the rewrite emits as graph nodes."""
    outside = router.renorm_outside_route
    w, ids = torch.ops.moec.route(logits, bias, router.top_k, router.scoring, router.renormalize and not outside,
                                  1.0 if outside else router.scale, router.n_group, router.topk_group,
                                  router.group_fill)
    if outside:
        w = w / (w.sum(-1, keepdim=True) + router.renorm_eps) * router.scale
    if router.capacity is None:
        return w, ids
    capacity = router.capacity if isinstance(router.capacity, int) else hint(value(router.capacity))
    keep = torch.ops.moec.capacity_keep(ids, num_experts, capacity, router.capacity_order)
    w, ids = w * keep, torch.where(keep, ids, -1)
    if router.renormalize:
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).eps)
    return w, ids


PROOF_FLOAT64_BYTES = 1 << 30    # experts larger than this in float64 prove in the model's dtype
_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _touched(ids, num_experts):
    """(experts the proof tokens reach, ids renumbered into that list; -1 stays dropped). The proof
    then copies only those experts (to float64 where it proves in float64)."""
    used = torch.unique(ids[ids >= 0])
    if used.numel() == 0:            # every copy dropped: one expert keeps the shapes valid
        used = torch.zeros(1, dtype=ids.dtype, device=ids.device)
    table = torch.full((num_experts,), -1, dtype=ids.dtype, device=ids.device)
    table[used] = torch.arange(used.numel(), dtype=ids.dtype, device=ids.device)
    return used, torch.where(ids >= 0, table[ids.clamp_min(0)], -1)


def _weight_args(experts, env, used, dtype):
    """(bases in `dtype`, layout): the arguments the rewrite will emit, on example values,
    restricted to the experts in `used` (dim 0 of every base is the expert; all of them in
    order: the bases themselves, no copy)."""
    bases, layout = layouts.pack((experts.up, experts.gate, experts.down, experts.up_bias,
                                  experts.gate_bias, experts.down_bias), experts.lora)
    first = env[bases[0]]
    every = used.numel() == first.shape[0] and bool((used == torch.arange(used.numel(), device=used.device)).all())
    return [(env[node] if every else env[node][used]).to(dtype) for node in bases], layout


def _with_lora(experts, lora):
    """A role reading a LoRA weight P = W + s * L @ R as P[:, sl] (or P^T[:, sl]) reads W the same
    way, plus s * B @ A with B = L[:, sl], A = R (or B = R^T[:, sl], A = L^T): exact algebra."""
    changes = {}
    for p in layouts.PROJECTIONS:
        spec = getattr(experts, p)
        if spec is None or spec[0] not in lora:
            continue
        form, (_, t, sl) = lora[spec[0]], spec
        a, b = ((form.lhs, True, None), (form.rhs, True, sl)) if t else ((form.rhs, False, None), (form.lhs, False, sl))
        changes[p], changes[f"lora_{p}"] = (form.base, t, sl), (a, b, form.scale)
    return dataclasses.replace(experts, **changes) if changes else experts


def _lora_values(lora, gen, dtype):
    """Random W, L, R for each LoRA weight and its merged value W + s * L @ R, by node."""
    values = {}
    for form in lora.values():
        for node, fan_in in ((form.base, shape(form.base)[2]), (form.lhs, 1), (form.rhs, shape(form.rhs)[2])):
            if node not in values:
                values[node] = _randn(_hint_shape(node), gen, node) * fan_in ** -0.5
        w, lhs, rhs = values[form.base], values[form.lhs], values[form.rhs]
        values[form.weight] = torch.baddbmm(w, lhs, rhs, alpha=form.scale)
    return {node: v.to(dtype) for node, v in values.items()}


def _expert_candidates(nodes, weights, real, num_experts, hidden, names):
    """Every (layout, activation) the shapes allow, most likely first."""
    first_use = {w: min((i for i, n in enumerate(nodes) if w in n.all_input_nodes), default=1 << 30)
                 for w in weights}
    stacked = sorted([w for w in weights if real[w].dim() == 3 and real[w].shape[0] == num_experts],
                     key=first_use.__getitem__)
    biases = sorted([w for w in weights if real[w].dim() == 2 and real[w].shape[0] == num_experts],
                    key=first_use.__getitem__)
    if len(stacked) not in (2, 3) or len(stacked) + len(biases) != len(weights):
        return
    down = stacked[-1]
    for down_t in _orientations(real[down].shape, hidden, want_out=hidden):
        ffn = real[down].shape[2 - down_t]
        for acts in [_activation_candidates(nodes, names)]:
            if len(stacked) == 2:
                up_node = stacked[0]
                for up_t in _orientations(real[up_node].shape, hidden, want_out=None):
                    n1 = real[up_node].shape[1 + up_t]
                    for layout in _layouts(n1, ffn):
                        yield from _with_biases(up_node, up_t, layout, down, down_t, biases, real,
                                                num_experts, hidden, ffn, acts)
            else:
                for g, u in ((stacked[0], stacked[1]), (stacked[1], stacked[0])):
                    for gt in _orientations(real[g].shape, hidden, want_out=None):
                        for ut in _orientations(real[u].shape, hidden, want_out=None):
                            for act in acts:
                                if act[0] == "swiglu_oai" and biases:
                                    continue
                                if biases:
                                    continue
                                yield Experts(num_experts, hidden, ffn, act[0], up=(u, ut, None),
                                              gate=(g, gt, None), down=(down, down_t, None),
                                              alpha=act[1], limit=act[2])


def _with_biases(up_node, up_t, layout, down, down_t, biases, real, E, H, F, acts):
    gated, gate_sl, up_sl = layout
    n1 = 2 * F if gated else F
    b1 = [b for b in biases if real[b].shape[1] == n1]
    b2 = [b for b in biases if real[b].shape[1] == H and b not in b1[:1]]
    if len(biases) > 2 or (len(biases) == 2 and not (b1 and b2)) or (len(biases) == 1 and not (b1 or b2)):
        return
    b1 = b1[0] if b1 and (len(biases) == 2 or not b2 or H != n1) else None
    b2 = next((b for b in biases if b is not b1), None)
    for act in acts:
        if not gated and act[0] == "swiglu_oai":
            continue
        yield Experts(
            E, H, F, act[0],
            up=(up_node, up_t, up_sl), gate=(up_node, up_t, gate_sl) if gated else None,
            down=(down, down_t, None),
            up_bias=(b1, False, up_sl) if b1 is not None else None,
            gate_bias=(b1, False, gate_sl) if (b1 is not None and gated) else None,
            down_bias=(b2, False, None) if b2 is not None else None,
            alpha=act[1], limit=act[2])


def _orientations(s, hidden, want_out):
    """Whether (E, a, b) must be transposed to read as (E, out, in) for y = x @ w.T."""
    out = []
    if want_out is None:  # first projection: in = hidden
        if s[2] == hidden:
            out.append(False)
        if s[1] == hidden:
            out.append(True)
    else:                 # down projection: out = hidden
        if s[1] == hidden:
            out.append(False)
        if s[2] == hidden:
            out.append(True)
    return out


def _layouts(n1, ffn):
    """(gated, gate slice, up slice) as (start, step, stop) along the output dim of w1."""
    if n1 == 2 * ffn:
        return [(True, (0, 1, ffn), (ffn, 1, 2 * ffn)), (True, (0, 2, None), (1, 2, None)),
                (True, (ffn, 1, 2 * ffn), (0, 1, ffn)), (True, (1, 2, None), (0, 2, None))]
    if n1 == ffn:
        return [(False, None, None)]
    return []


def _activation_candidates(nodes, names):
    floats = _float_constants(nodes, (operator.mul, "mul"))
    clamps = sorted({abs(v) for n in nodes if op_name(n) in ("clamp", "clamp_")
                     for v in list(n.args[1:]) + list(n.kwargs.values()) if isinstance(v, float)})
    acts = []
    if "sigmoid" in names and clamps:
        acts += [("swiglu_oai", a, l) for a in floats for l in clamps]
    gelu_tanh = any(op_name(n) == "gelu" and n.kwargs.get("approximate") == "tanh" for n in nodes)
    present = [a for a in ("silu", "gelu_tanh" if gelu_tanh else "gelu", "relu") if a in names or
               (a == "gelu_tanh" and gelu_tanh)]
    acts += [(a, 0.0, 0.0) for a in present]
    acts += [(a, 0.0, 0.0) for a in ("silu", "gelu", "gelu_tanh", "relu") if a not in present]
    return acts


# ---------------------------------------------------------------------------------- helpers


def _extract(gm, nodes, inputs, outputs):
    """A GraphModule computing `outputs` from `inputs` with copies of `nodes`."""
    g = fx.Graph()
    env = {i: g.placeholder(f"in_{k}") for k, i in enumerate(inputs)}
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, g)


def _args(inputs, given, real, dtype):
    out = []
    for i in inputs:
        if i in given:
            out.append(given[i])
        elif i in real:
            t = real[i].detach()
            out.append(t.to(dtype) if t.is_floating_point() else t)
        else:
            out.append(hint(value(i)))
    return out


def _randn(shape, gen, like):
    """Fresh float64 values on the device the layer runs on (its weights stay where they are)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(value(like).device)


def _float_constants(nodes, targets):
    vals = []
    for n in nodes:
        if n.target in targets or op_name(n) in targets:
            vals += [a for a in n.args if isinstance(a, float) and a not in vals]
    return vals


def _hint_shape(node):
    s = shape(node)
    return tuple(hint(d) for d in s) if s is not None else None


def _double(t):
    return None if t is None else t.double()
