"""What the pass `chunk_tokens` asks the cost model: op times from shapes, and one k for all ranks.

    costs = layer_costs(layer, compute, dtype_bytes)   LayerCosts of one MoE layer: each candidate
        op's time whole and in k chunks from its FLOPs and bytes (`ComputeModel.op`, a roofline on
        the calibrated rates; nothing is run), the experts (plus the ops beside them, e.g. a shared
        expert, that run between the dispatch and the experts), the all-to-all bytes
    sched = agree(costs_or_reason, a2a, group)   every rank of the EP group the same k (a collective)
    sched = forced(costs_or_reason, a2a, k, ...)  Config.ep_chunks = k: every candidate op chunked

Every rank must chunk a layer into the same k, or the all-to-alls pair up wrongly. The ranks'
tokens, and so their costs, may differ, so `agree` all-gathers each rank's costs (or its reason
for not chunking) at compile time and every rank searches the same numbers: per op the slowest
rank's time, where the ranks found the same candidate ops; else rank 0's for k, each rank then
picking its own ranges for that k. Any rank that cannot chunk the layer makes every rank leave it
whole. This is a collective at compile time, like the calibration it follows: every rank must
compile the same graphs in the same order (true of EP training steps with the same shapes on every
rank; a recompilation on one rank alone would wait here for the others). A forced k needs none.

The search times the stage-major program of schedule_search.py (all pre chunks, then all experts,
then all post chunks); chunk_tokens emits it software-pipelined (chunk i+1's dispatch before
chunk i's experts), which dropless mode's host sync per chunk needs, and the model does not see:
the prediction is the model's, not a simulation of the emitted order.
"""
import dataclasses

import torch
import torch.distributed as dist

from moec.codegen.errors import MoecError
from moec.runtime import LayerCosts, Op, predict, search
from moec.runtime.expert_parallel import capacity

from .graph import hint, value
from .node_costs import nbytes, tensors

K_MAX = 8
MIN_GAIN = 0.02      # chunk only for a predicted gain above this: a cat per value read outside, a host
                     # sync per chunk and more kernels per op are costs the model does not see


def node_op(node, kind: str, compute, name: str = "") -> Op:
    """The `Op` for one candidate node of the kind its token-locality rule gave."""
    name = name or node.name
    if kind in ("view", "permute", "index", "getitem"):
        return Op(name, 0.0)                           # views: no kernel
    out = tensors(value(node))
    ins = {a: value(a) for a in node.all_input_nodes if isinstance(value(a), torch.Tensor)}
    out_bytes = sum(nbytes(t) for t in out)
    in_bytes = sum(nbytes(t) for t in ins.values())
    if kind == "linear":
        x, w = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        flops = 2.0 * sum(t.numel() for t in out) * value(x).shape[-1]
        fixed = sum(nbytes(t) for a, t in ins.items() if a is not x)
        return compute.op(name, flops, in_bytes + out_bytes, fixed, k_max=K_MAX)
    if kind == "batched":                              # (..., M, K) @ (..., K, N)
        flops = 2.0 * sum(t.numel() for t in out) * value(node.args[0]).shape[-1]
        return compute.op(name, flops, in_bytes + out_bytes, 0.0, k_max=K_MAX)
    if kind == "attention":
        return compute.op(name, _attention_flops(node), in_bytes + out_bytes, 0.0, k_max=K_MAX)
    return compute.op(name, float(sum(t.numel() for t in out)), in_bytes + out_bytes, 0.0, k_max=K_MAX)


def _attention_flops(node) -> float:
    """scaled_dot_product_attention: q k^T and p v, 2 * 2 * (..., Sq, Sk, d) multiply-adds; half of
    the scores under a causal mask (what a flash kernel skips)."""
    q, k = (value(a) for a in node.args[:2])
    flops = 4.0 * q.numel() * k.shape[-2]
    causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)
    return flops / 2 if causal is True else flops


def layer_costs(layer, compute, kinds: dict, capacity_factor: float = 0.0) -> LayerCosts:
    """LayerCosts for a layer found by `chunk_tokens` (its .pre, .post, .side node lists, .x, .ep,
    .weights, .top_k and .num_experts); `kinds` maps each node to its rule's kind. Capacity mode
    sends the padded (E, C, H) slots, not the S copies."""
    x = value(layer.x)
    S, H = hint(x.shape[0]) * layer.top_k, hint(x.shape[1])
    es = x.element_size()
    sent = layer.num_experts * capacity(S, layer.num_experts, capacity_factor) if capacity_factor > 0 else S
    weights = [value(w) for w in layer.weights]
    per_expert = sum(w.numel() for w in weights) / layer.num_experts      # parameters per expert
    local_bytes = sum(nbytes(w) for w in weights) / layer.ep_size          # this rank's experts
    experts = compute.op("experts", 2.0 * S * per_expert, local_bytes + 4.0 * S * H * es, local_bytes, k_max=K_MAX)
    side = [node_op(n, kinds[n], compute) for n in layer.side]
    if side:                                           # they run between dispatch and experts
        times = [experts.chunk_s(k) + sum(op.chunk_s(k) for op in side) for k in range(1, K_MAX + 1)]
        experts = Op("experts", times[0], True, experts.fixed_s + sum(op.fixed_s for op in side), tuple(times))
    rows = float(sent * H * es)
    return LayerCosts(tuple(node_op(n, kinds[n], compute) for n in layer.pre), rows, experts, rows,
                      tuple(node_op(n, kinds[n], compute) for n in layer.post))


def forced(mine, a2a, k: int, n_pre: int, n_post: int):
    """(k, pre_range, post_range, schedule or None, why) for a k the user set: all n_pre + n_post
    candidate ops chunked; no collective (the same option on every rank is the agreement). `mine`
    as in `agree`, or None where no calibration is cached (nothing is predicted then)."""
    if isinstance(mine, str):
        return 1, None, None, None, mine
    full = ((0, n_pre), (0, n_post))
    sched = predict(mine, a2a, k, *full) if mine is not None and a2a is not None else None
    return k, *full, sched, f"ep_chunks={k}" + ("" if sched else ", nothing predicted: no all-to-all calibration "
                                                                  "cached for this group")


def agree(mine, a2a, group, k_max: int = K_MAX):
    """(k, pre_range, post_range, schedule or None, why), the same k on every rank of `group`.
    `mine` is this rank's LayerCosts or a string saying why it cannot chunk the layer; k_max the
    most chunks it can cut (its units: the sequences where it chunks whole sequences)."""
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (_plain(mine), k_max), group=group)
    k_max = min(m for _, m in everyone)
    everyone = [c for c, _ in everyone]
    blocked = [(r, why) for r, why in enumerate(everyone) if isinstance(why, str)]
    if blocked:
        r, why = blocked[0]
        return 1, None, None, None, f"rank {r} cannot chunk it: {why}"
    costs = mine
    if a2a is None:
        return 1, None, None, None, "no all-to-all model (a group of one rank)"
    same = all(_names(c) == _names(everyone[0]) for c in everyone)
    shared = _slowest([_unplain(c, costs) for c in everyone]) if same else _unplain(everyone[0], costs)
    chosen = search(shared, a2a, k_max)
    if chosen.k > 1 and chosen.step_s > (1 - MIN_GAIN) * chosen.unchunked_s:
        return 1, None, None, chosen.unchunked(), f"cost model: k={chosen.k} would save under {MIN_GAIN:.0%}"
    if same:
        return chosen.k, chosen.pre_range, chosen.post_range, chosen, "cost model"
    pre, post, sched = _best_ranges(costs, a2a, chosen.k)
    return chosen.k, pre, post, sched, "cost model (k from rank 0's costs: the ranks found different ops)"


def as_agreed(mine, a2a, k: int):
    """(k, pre_range, post_range, schedule or None, why) for the k the ranks agreed on at an earlier
    compile of this layer (a recompile, maybe on this rank only: no collective), the ranges this
    rank's costs do best with."""
    why = f"cost model (k={k} agreed at the layer's first compile)"
    if k == 1:
        return 1, None, None, None, why
    if isinstance(mine, str):
        raise MoecError(f"chunk_tokens: the ranks agreed on k={k} chunks for this layer at its first compile, "
                        f"but this recompile cannot chunk it ({mine}); the ranks' all-to-alls would not pair "
                        f"up: set ep_chunks to a fixed k or mark the token count dynamic from the start")
    return (k, *_best_ranges(mine, a2a, k), why)     # k > 1: the agreement had an all-to-all model


def agree_sequences(token_saved: float, sequence_saved, group) -> bool:
    """Whether every rank cuts a layer in whole sequences rather than tokens: every rank can
    (sequence_saved, the predicted time it saves then, is not None) and together they save more,
    by more than MIN_GAIN (a near tie keeps tokens: finer chunks, fewer ops changed)."""
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (token_saved, sequence_saved), group=group)
    if any(s is None for _, s in everyone):
        return False
    return sum(s for _, s in everyone) > (1 + MIN_GAIN) * sum(t for t, _ in everyone)


def _best_ranges(costs, a2a, k):
    """The pre suffix and post prefix with the least predicted time for a given k."""
    best = None
    for lo in range(len(costs.pre), -1, -1):
        if lo < len(costs.pre) and not costs.pre[lo].splittable:
            break
        for hi in range(len(costs.post) + 1):
            if hi and not costs.post[hi - 1].splittable:
                break
            s = predict(costs, a2a, k, (lo, len(costs.pre)), (0, hi))
            if best is None or s.step_s < best.step_s * (1 - 1e-9):
                best = s
    return best.pre_range, best.post_range, best


def _plain(c):
    if isinstance(c, str):
        return c
    ops = lambda seq: [dataclasses.asdict(o) for o in seq]   # noqa: E731
    return {"pre": ops(c.pre), "post": ops(c.post), "experts": dataclasses.asdict(c.experts),
            "dispatch": c.dispatch_bytes, "combine": c.combine_bytes}


def _unplain(d, like):
    op = lambda o: Op(o["name"], o["time_s"], o["splittable"], o["fixed_s"], tuple(o["chunk_times"]))  # noqa: E731
    return LayerCosts(tuple(map(op, d["pre"])), d["dispatch"], op(d["experts"]), d["combine"],
                      tuple(map(op, d["post"])), like.rank)


def _names(d) -> tuple:
    return tuple(o["name"] for o in d["pre"]), tuple(o["name"] for o in d["post"])


def _slowest(all_costs) -> LayerCosts:
    """Per op, the slowest rank's times (whole and per k)."""
    def worst(ops):
        times = [max(o.chunk_s(k) for o in ops) for k in range(1, K_MAX + 1)]
        return Op(ops[0].name, times[0], all(o.splittable for o in ops), min(max(o.fixed_s for o in ops), times[0]),
                  tuple(times))
    first = all_costs[0]
    return LayerCosts(tuple(worst(ops) for ops in zip(*(c.pre for c in all_costs))),
                      max(c.dispatch_bytes for c in all_costs), worst([c.experts for c in all_costs]),
                      max(c.combine_bytes for c in all_costs),
                      tuple(worst(ops) for ops in zip(*(c.post for c in all_costs))), first.rank)
