"""Analysis `token_buckets`: may this graph run its token count padded up to a bucket? (graph unchanged;
moec/buckets.py asks only where buckets are wanted, so other compiles pay nothing for it)

Why: CUDA graphs (mode="reduce-overhead") are captured per input shape, so a serving loop whose
token count T changes every step would capture a graph per count. Run on T padded to a bucket
(the next power of two), a graph is captured per bucket and replayed for every T in it. That is
sound only where each output row depends on the same input rows alone: then the pad rows compute
values nobody reads, and the real rows are those the graph computes unpadded.

Expects: the final graph (after every rewrite), its real example inputs, a symbolic T (a dynamic
graph; a static one is captured for its one shape anyway).
Guarantees: a `BucketPlan` (the inputs and dims to pad, the size inputs to raise, the outputs and
dims to cut back) only where
    - every MoE layer reads the same symbolic T = s, and the graph has no higher-order op body;
    - every node that depends on a padded input is a size computation, an op of an MoE layer
      without capacity or expert counters (each token is routed and combined alone), or
      token-local by passes/token_locality.py's shape rules;
    - no input is written in place (a KV cache would be written by the pad rows) and every output
      that depends on them carries T in one dim;
else the reason, for the log and the dumps. `check` then runs the graph on the example inputs with
random pad rows against the unpadded run (the shape rules checked on the graph itself: sizes are
symbolic, so token_locality's node-level checks cannot run). Must not change: the graph.
"""
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._python_dispatch import _disable_current_modes

from moec.codegen.tuning import bucket

from . import token_locality as tl
from .graph import DepGraph, op_name, value

_OPS = torch.ops.moec
_LAYER_OPS = {_OPS.route.default, _OPS.plan.default, _OPS.route_plan.default, _OPS.router_plan.default,
              _OPS.experts.default, _OPS.combine.default, _OPS.experts_combine.default, _OPS.experts_save.default}
_SIZE_OPS = {torch.ops.aten.sym_size.int, operator.mul, operator.add, operator.sub, operator.floordiv,
             torch.sym_max, torch.sym_min}


_NO_LAYER = "no MoE layer"
_STATIC = "the MoE layers' token count is not one symbolic size"


@dataclass(frozen=True)
class BucketPlan:
    token_input: tuple      # (input index, dim) whose size is T
    pads: tuple             # (input index, dim) per tensor input to pad
    sizes: tuple            # input indices whose value is T itself
    cuts: tuple             # (output index, dim) per output to cut back


@dataclass(frozen=True)
class BucketReport:
    plan: BucketPlan | None = None
    why: str = ""
    static: bool = False    # no symbolic token count (or no MoE layer): one shape, nothing to bucket

    def log_lines(self):
        if self.plan is None:
            return [f"token counts cannot be padded to buckets: {self.why}"]
        return [f"token counts can be padded to buckets: inputs {[i for i, _ in self.plan.pads]} padded, "
                f"outputs {[i for i, _ in self.plan.cuts]} cut back"]


def analyse(gm: fx.GraphModule) -> BucketReport:
    plan, why = _plan(gm)
    return BucketReport(plan, why, why in (_NO_LAYER, _STATIC))


def _plan(gm):
    graph = gm.graph
    if any(isinstance(m, fx.GraphModule) for name, m in gm.named_children()):
        return None, "the graph has subgraphs (activation checkpointing, control flow): not analysed"
    layers = [n for n in graph.nodes if n.target in (_OPS.experts_combine.default, _OPS.experts.default)]
    if not layers:
        return None, _NO_LAYER
    counts = [value(n.args[0]).shape[0] for n in layers]
    T = counts[0]
    if not isinstance(T, torch.SymInt) or not T.node.expr.is_Symbol or \
            not all(statically_known_true(c == T) for c in counts):
        return None, _STATIC
    if any(n.target is _OPS.capacity_keep.default for n in graph.nodes):
        return None, "capacity routing drops tokens by count: pad tokens would take capacity"
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    pads, sizes = [], []
    for i, n in enumerate(placeholders):
        v = value(n)
        if isinstance(v, torch.SymInt) and statically_known_true(v == T):
            sizes.append(i)
        elif isinstance(v, torch.Tensor):
            dims = [d for d, s in enumerate(v.shape) if statically_known_true(s == T)]
            if len(dims) > 1:
                return None, f"input {n.name} has T in two dims"
            pads += [(i, dims[0])] if dims else []
    if not pads:
        return None, "no input carries the token count"
    deps = DepGraph.build(graph)
    padded = {placeholders[i] for i, _ in pads} | {placeholders[i] for i in sizes}
    if any(deps.root[m] in set(placeholders) for m in deps.mutations):
        return None, "an input is written in place (a cache?): pad rows would write it"
    tainted = deps.forward_slice(padded)
    for n in deps.sorted(tainted - set(placeholders)):
        why = _why_not_local(n, T)
        if why:
            return None, f"{n.name} ({op_name(n)}): {why}"
    outputs = fx.node.map_arg(next(n for n in graph.nodes if n.op == "output").args[0], lambda a: a)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    cuts = []
    for j, o in enumerate(outputs):
        if not isinstance(o, fx.Node) or o not in tainted:
            continue
        v = value(o)
        dims = [d for d, s in enumerate(getattr(v, "shape", ())) if statically_known_true(s == T)]
        if o.op == "placeholder" or len(dims) != 1:
            return None, f"output {j} ({o.name}) depends on the tokens but does not carry them in one dim"
        cuts.append((j, dims[0]))
    return BucketPlan(pads[0], tuple(pads), tuple(sizes), tuple(cuts)), ""


def _why_not_local(n, T) -> str:
    if n.target in _LAYER_OPS:
        return ""
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0].target in _LAYER_OPS:
        return ""
    v = value(n)
    if isinstance(v, (torch.SymInt, int)) and (n.target in _SIZE_OPS or op_name(n) == "size"):
        return ""
    # Reshapes to symbolic sizes are taken: the padded run raises those sizes with the tokens.
    return "" if tl.rule(n, T, symbolic_views=True) is not None else "not token-local by the shape rules"


def check(gm, example_inputs, plan) -> str:
    """'' if the graph on the example inputs equals, where cut back, the graph on them padded with
    random rows; else why not. Runs the graph twice: the backend calls it only where buckets are
    wanted, before the dense backend compiles (and may change) the graph."""
    i, d = plan.token_input
    T = int(example_inputs[i].shape[d])
    B = max(bucket(T), T + 1)       # at least one pad row, even where T is a power of two
    with torch.no_grad(), _disable_current_modes():
        base = [T if k in plan.sizes else a for k, a in enumerate(example_inputs)]
        padded = pad(base, plan, T, B, fill=lambda like: torch.rand_like(like) + 0.5 if like.is_floating_point()
                     else torch.zeros_like(like))
        try:
            want, got = gm(*base), gm(*padded)
        except Exception as e:  # noqa: BLE001 -- a graph that cannot run padded is not bucketed
            return f"the graph does not run on padded inputs ({type(e).__name__}: {str(e)[:80]})"
        got = cut(got, plan, T)
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor) and not (a.shape == b.shape and _same_rows(a, b)):
            return "run on padded inputs, the real rows changed: some op mixes tokens"
    return ""


def _same_rows(a, b) -> bool:
    if not a.is_floating_point() or a.dtype.itemsize >= 4:
        return torch.allclose(a, b, rtol=1e-3, atol=1e-5, equal_nan=True)
    # Kernels pick their tiles by token count: the padded run may sum in another order, and a bf16
    # result rounds a few ulps apart. Pad rows that reach real rows move them by far more.
    eps = 4 * torch.finfo(a.dtype).eps
    scale = a.float().abs().amax().item() if a.numel() else 0.0
    return torch.allclose(a.float(), b.float(), rtol=eps, atol=eps * scale, equal_nan=True)


def pad(args, plan, T, B, fill=None):
    """args with each planned input grown from T to B along its dim (zeros, or `fill(like)`) and
    each size input set to B."""
    out = list(args)
    for i, d in plan.pads:
        a = out[i]
        shape = list(a.shape)
        shape[d] = B - T
        extra = a.new_zeros(shape) if fill is None else fill(a.new_empty(shape))
        out[i] = torch.cat([a, extra], dim=d)
    for i in plan.sizes:
        out[i] = B
    return out


def cut(outputs, plan, T):
    """The planned outputs cut back to their first T along their dim."""
    out = list(outputs)
    for j, d in plan.cuts:
        out[j] = out[j].narrow(d, 0, T)
    return type(outputs)(out) if isinstance(outputs, tuple) else out
