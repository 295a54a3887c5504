"""`torch.ops.moec.*`: the interface passes emit and kernels implement.

Each op has a fake implementation (shapes only, so graphs with symbolic token counts trace
without recompiling), input checks that run at trace time too, and an autograd formula whose
backward is itself an op, so AOT autograd keeps it opaque and a kernel can replace it. Bodies
dispatch by `kernels.use_triton`: CUDA tensors run the Triton kernels (imported lazily, so the
CPU path needs no Triton), CPU tensors the plain-PyTorch twins in `reference.py`.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from . import kernels, reference
from . import layout as layouts
from .dispatch import moec_op
from .errors import MoecKernelError

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SCORINGS = ("softmax", "softmax_after_topk", "sigmoid")
_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")


# ------------------------------------------------------------------------------------ route


@moec_op("route")
def route(logits: Tensor, bias: Optional[Tensor], k: int, scoring: str, renormalize: bool,
          scale: float, n_group: int, topk_group: int, group_fill: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """logits (T, E) -> weights (T, k) float32 (float64 for float64 logits), ids (T, k) int64.
    Grouped (sigmoid, n_group > 1): experts outside the best topk_group groups cannot be chosen,
    or with group_fill, are chosen by the score group_fill (transformers' DeepseekV3 fills 0.0)."""
    _check_route(logits, bias, k, scoring, n_group, topk_group, group_fill)
    if kernels.use_triton(logits):
        from .route_kernel import route_launch
        return route_launch(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, group_fill)
    w, ids = reference.route(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, group_fill)
    return w.contiguous(), ids.contiguous()


@route.register_fake
def _(logits, bias, k, scoring, renormalize, scale, n_group, topk_group, group_fill=None):
    _check_route(logits, bias, k, scoring, n_group, topk_group, group_fill)
    T = logits.shape[0]
    w_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(T, k, dtype=w_dtype), logits.new_empty(T, k, dtype=torch.int64)


@moec_op("route_backward")
def route_backward(grad_weights: Tensor, logits: Tensor, ids: Tensor, scoring: str,
                   renormalize: bool, scale: float) -> Tensor:
    if kernels.use_triton(logits):
        from .route_backward_kernel import route_backward_launch
        return route_backward_launch(grad_weights, logits, ids, scoring, renormalize, scale)
    return reference.route_weights_backward(grad_weights, logits, ids, scoring, renormalize, scale)


@route_backward.register_fake
def _(grad_weights, logits, ids, scoring, renormalize, scale):
    return torch.empty_like(logits)


def route_setup(ctx, inputs, output):
    """Autograd of route and route_plan: (logits, bias, k, scoring, renormalize, scale, ...) in,
    (weights, ids, ...) out; only the weights carry a gradient, into the logits."""
    logits, _bias, _k, scoring, renormalize, scale = inputs[:6]
    ctx.save_for_backward(logits, output[1])
    ctx.args = (scoring, renormalize, scale)
    ctx.n_inputs = len(inputs)


def route_bwd(ctx, grad_weights, *_grad_rest):
    logits, ids = ctx.saved_tensors
    grad = torch.ops.moec.route_backward(grad_weights.contiguous(), logits, ids, *ctx.args)
    return (grad,) + (None,) * (ctx.n_inputs - 1)


route.register_autograd(route_bwd, setup_context=route_setup)


def _check_route(logits, bias, k, scoring, n_group, topk_group, group_fill=None):
    _check_float("route", "logits", logits, dims=2)
    E = logits.shape[1]
    if scoring not in _SCORINGS:
        raise MoecKernelError(f"moec.route: scoring={scoring!r}; expected one of {_SCORINGS}")
    if not 1 <= k <= E:
        raise MoecKernelError(f"moec.route: top-k {k} must be between 1 and the number of experts {E}")
    if bias is not None:
        _check_float("route", "bias", bias, dims=1)
        _same_device("route", logits, bias=bias)
        if bias.shape[0] != E:
            raise MoecKernelError(f"moec.route: bias has {bias.shape[0]} entries, logits have {E} experts")
    if n_group > 1 and (E % n_group or not 1 <= topk_group <= n_group):
        raise MoecKernelError(f"moec.route: {E} experts cannot form {n_group} groups keeping {topk_group}")
    if n_group > 1 and group_fill is None and topk_group * (E // n_group) < k:
        raise MoecKernelError(f"moec.route: top-k {k} from {topk_group} kept groups of {E // n_group} experts: "
                              "too few experts can be chosen (pass group_fill to score the others)")


# ------------------------------------------------------------------------------------- plan


@moec_op("plan")
def plan(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """ids (T, k) -> offsets (E+1,), src (T*k,), inv (T*k,), int64; ids outside [0, E) dropped."""
    _check_plan(ids, num_experts)
    if kernels.use_triton(ids):
        from .plan_kernel import plan_launch
        return plan_launch(ids, num_experts)
    return reference.plan(ids, num_experts)


@plan.register_fake
def _(ids, num_experts):
    _check_plan(ids, num_experts)
    S = ids.numel()
    new = lambda n: ids.new_empty(n, dtype=torch.int64)
    return new(num_experts + 1), new(S), new(S)


def _check_plan(ids, num_experts):
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
        raise MoecKernelError(f"moec.plan: ids must be a (tokens, k) int32/int64 tensor, got "
                              f"{ids.dtype} of shape {tuple(ids.shape)}")
    if num_experts < 1:
        raise MoecKernelError(f"moec.plan: num_experts={num_experts}; need at least one expert")


# ---------------------------------------------------------------------------------- experts


@moec_op("experts")
def experts(x: Tensor, src: Tensor, offsets: Tensor, k: int, weights: list[Tensor], layout: str,
            activation: str, alpha: float, limit: float) -> Tensor:
    """x (T, H), grouped copies src (S,) by offsets (E+1,) -> y (S, H) in x's dtype.

    weights: the distinct base tensors the experts read; `layout` (see codegen/layout.py) says
    which view of which base is each of w_up, w_gate, w_down, b_up, b_gate, b_down, and of the
    LoRA factors of any projection (computed beside its GEMM, never merged into its weight)."""
    roles = _check_experts(x, src, offsets, weights, layout, activation)
    if kernels.use_triton(x):
        from .experts_launch import experts_forward
        return experts_forward(x, src, offsets, k, weights, layout, activation, alpha, limit, roles=roles)[0]
    return reference.experts(x, src, offsets, k, weights, layout, activation, alpha, limit)


@experts.register_fake
def _(x, src, offsets, k, weights, layout, activation, alpha, limit):
    _check_experts(x, src, offsets, weights, layout, activation)
    return x.new_empty(src.shape[0], x.shape[1])


@moec_op("experts_backward")
def experts_backward(grad_y: Tensor, x: Tensor, src: Tensor, offsets: Tensor, k: int, weights: list[Tensor],
                     layout: str, activation: str, alpha: float, limit: float, needs: list[bool],
                     pre: Optional[Tensor] = None) -> list[Tensor]:
    """[dx, one gradient per base in `weights`]: each base's gradient is one buffer (strides of
    the base), every role's share written into its view of it. A base with needs[i] False (a
    frozen weight) gets an empty (0,) tensor and no work. pre: `experts_save`'s pre-activations,
    read instead of recomputing them (the references recompute)."""
    if kernels.use_triton(x):
        from .experts_launch import experts_backward as launch
        grads = launch(grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit, needs, pre)
    else:
        grads = reference.experts_backward(grad_y, x, src, offsets, k, weights, layout, activation, alpha,
                                           limit, needs)
    return filled_grads(grads, x)


@experts_backward.register_fake
def _(grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit, needs, pre=None):
    return [torch.empty_like(x, memory_format=torch.contiguous_format)] + \
        fake_grads(weights, needs, x)


@moec_op("experts_backward_rows")
def experts_backward_rows(grad_y: Tensor, x: Tensor, src: Tensor, offsets: Tensor, k: int, weights: list[Tensor],
                          layout: str, activation: str, alpha: float, limit: float,
                          pre: Optional[Tensor] = None) -> list[Tensor]:
    """`experts_backward` without its weight gradients: [dx (T, H), h, du, dg (S, F) grouped; dg
    (0,) without a gate], what `experts_wgrad` needs for them. Split so that a backward pass can
    send dx (an all-to-all) while the weight gradients compute. No LoRA layouts."""
    _check_split(layout, "experts_backward_rows")
    if kernels.use_triton(x):
        from .experts_launch import experts_backward_rows as launch
        return launch(grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit, pre)
    return reference.experts_backward_rows(grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit)


@experts_backward_rows.register_fake
def _(grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit, pre=None):
    _check_split(layout, "experts_backward_rows")
    S, F = src.shape[0], layouts.views(weights, layout)[0].shape[1]
    gated = "w_gate" in layouts.parse(layout)
    return [torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(S, F), x.new_empty(S, F),
            x.new_empty(S, F) if gated else x.new_empty(0)]


@moec_op("experts_wgrad")
def experts_wgrad(grad_y: Tensor, x: Tensor, src: Tensor, offsets: Tensor, k: int, h: Tensor, du: Tensor,
                  dg: Tensor, weights: list[Tensor], layout: str, needs: list[bool]) -> list[Tensor]:
    """The weight gradients of `experts_backward` from `experts_backward_rows`' h, du, dg: one per
    base in `weights`, as `experts_backward` returns them (an empty (0,) tensor where needs[i] is
    False)."""
    _check_split(layout, "experts_wgrad")
    if kernels.use_triton(x):
        from .experts_launch import experts_wgrad as launch
        grads = launch(grad_y, x, src, offsets, k, h, du, dg, weights, layout, needs)
    else:
        grads = reference.experts_wgrad(grad_y, x, src, offsets, k, h, du, dg, weights, layout, needs)
    return filled_grads(grads, x)


@experts_wgrad.register_fake
def _(grad_y, x, src, offsets, k, h, du, dg, weights, layout, needs):
    _check_split(layout, "experts_wgrad")
    return fake_grads(weights, needs, x)


def _check_split(layout, op):
    if layouts.has_lora(layout):
        raise MoecKernelError(f"moec.{op}: layout {layout!r} has LoRA factors, whose gradients need more than "
                              f"h, du, dg; use moec.experts_backward")


def _experts_setup(ctx, inputs, output):
    x, src, offsets, k, weights, layout, activation, alpha, limit = inputs
    ctx.save_for_backward(x, src, offsets, *weights)
    ctx.args = (k, layout, activation, alpha, limit)
    # frozen bases (LoRA's W) get no gradient: the backward skips their GEMMs
    ctx.needs = [w.requires_grad for w in weights]


def _experts_bwd(ctx, grad_y):
    x, src, offsets, *weights = ctx.saved_tensors
    k, layout, activation, alpha, limit = ctx.args
    g = torch.ops.moec.experts_backward(grad_y.contiguous(), x, src, offsets, k, weights, layout,
                                        activation, alpha, limit, ctx.needs)
    grads = [t if need else None for t, need in zip(g[1:], ctx.needs)]
    return g[0], None, None, None, grads, None, None, None, None


experts.register_autograd(_experts_bwd, setup_context=_experts_setup)


@moec_op("experts_save")
def experts_save(x: Tensor, src: Tensor, offsets: Tensor, k: int, weights: list[Tensor], layout: str,
                 activation: str, alpha: float, limit: float) -> tuple[Tensor, Tensor]:
    """`experts` for training where its combine is not beside it (expert parallelism): -> (y, pre),
    pre (S, 2F, or F without a gate) the pre-activations u and g (LoRA terms included; their
    columns as `grouped_mm_forward.pre_columns` says), which autograd keeps so that the backward
    does not recompute them."""
    roles = _check_experts(x, src, offsets, weights, layout, activation)
    S, width = src.shape[0], layouts.preactivation_width(weights, layout, roles)
    if kernels.use_triton(x):     # rows past offsets[E] (dropped copies) are never read
        from .experts_launch import experts_forward
        return tuple(experts_forward(x, src, offsets, k, weights, layout, activation, alpha, limit, True,
                                     roles=roles))
    pre = x.new_zeros(S, width)
    return reference.experts(x, src, offsets, k, weights, layout, activation, alpha, limit, pre), pre


@experts_save.register_fake
def _(x, src, offsets, k, weights, layout, activation, alpha, limit):
    _check_experts(x, src, offsets, weights, layout, activation)
    S = src.shape[0]
    return x.new_empty(S, x.shape[1]), x.new_empty(S, layouts.preactivation_width(weights, layout))


def saved_preactivations(ctx, pre):
    """For the ops that return the pre-activations beside their result (experts_save,
    experts_combine): pre never has a gradient. Without set_materialize_grads(False) autograd
    would hand the backward a zeros_like(pre) (S x 2F: 96 MiB and a memset per layer at Qwen3
    widths, 4096 tokens), alive through the backward's peak; the other output always has a
    gradient when the backward runs."""
    ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)


def _save_setup(ctx, inputs, output):
    x, src, offsets, k, weights, layout, activation, alpha, limit = inputs
    ctx.save_for_backward(x, src, offsets, output[1], *weights)
    saved_preactivations(ctx, output[1])
    ctx.args = (k, layout, activation, alpha, limit)
    ctx.needs = [w.requires_grad for w in weights]


def _save_bwd(ctx, grad_y, _grad_pre):
    x, src, offsets, pre, *weights = ctx.saved_tensors
    k, layout, activation, alpha, limit = ctx.args
    g = torch.ops.moec.experts_backward(grad_y.contiguous(), x, src, offsets, k, weights, layout, activation, alpha,
                                        limit, ctx.needs, pre)
    grads = [t if need else None for t, need in zip(g[1:], ctx.needs)]
    return g[0], None, None, None, grads, None, None, None, None


experts_save.register_autograd(_save_bwd, setup_context=_save_setup)


@functools.lru_cache(maxsize=256)
def _check_layout(layout, n_weights):
    """What a layout string must satisfy whatever the tensors (once per layout: a launch's host time counts)."""
    try:
        parsed = layouts.parse(layout)
    except ValueError as e:
        raise MoecKernelError(f"moec.experts: layout {layout!r}: {e}") from None
    if "w_up" not in parsed or "w_down" not in parsed:
        raise MoecKernelError(f"moec.experts: layout {layout!r} must give w_up and w_down")
    bad = [v.index for v in parsed.values() if v.index >= n_weights]
    unused = set(range(n_weights)) - {v.index for v in parsed.values()}
    if bad or unused:
        raise MoecKernelError(f"moec.experts: layout {layout!r} must use each of the {n_weights} weights "
                              f"(indices 0..{n_weights - 1}) at least once")
    if "lora_a_gate" in parsed and "w_gate" not in parsed:
        raise MoecKernelError(f"moec.experts: layout {layout!r} gives LoRA factors to gate but no w_gate")


def _check_experts(x, src, offsets, weights, layout, activation):
    """-> the role views (layout.views), which the launch then takes instead of building them again
    (three views cost ~11 us of a one-token call's host time on the 2-core CPU machine)."""
    _check_float("experts", "x", x, dims=2)
    _check_layout(layout, len(weights))
    for i, w in enumerate(weights):
        if w.dim() not in (2, 3):   # views need (E, N) or (E, N, K); shapes are checked per role below
            roles = layouts.users(layout, len(weights))[i]
            raise MoecKernelError(f"moec.experts: weights[{i}] ({', '.join(roles)}) must be 2-D or 3-D, "
                                  f"got shape {tuple(w.shape)}")
    roles = layouts.views(weights, layout)
    w_up, w_gate = roles[0], roles[1]
    E, F, H = w_up.shape if w_up.dim() == 3 else (None, None, None)
    if E is None or H != x.shape[1]:
        raise MoecKernelError(f"moec.experts: w_up must be (experts, ffn, hidden={x.shape[1]}), got "
                              f"{tuple(w_up.shape)}")
    want = {"w_up": (E, F, H), "w_gate": (E, F, H), "w_down": (E, H, F), "b_up": (E, F), "b_gate": (E, F),
            "b_down": (E, H)}
    for name, t in zip(layouts.ROLES, roles):
        if t is None:
            continue
        _check_float("experts", name, t, dims=len(want[name]))
        _same_device("experts", x, **{name: t})
        if tuple(t.shape) != want[name]:
            raise MoecKernelError(f"moec.experts: {name} must have shape {want[name]}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise MoecKernelError(f"moec.experts: {name} is {t.dtype} but x is {x.dtype}; cast one of them")
    _check_lora(x, weights, layout, E, F, H)
    if activation not in _ACTIVATIONS:
        raise MoecKernelError(f"moec.experts: activation={activation!r}; expected one of {_ACTIVATIONS}")
    if activation == "swiglu_oai" and w_gate is None:
        raise MoecKernelError("moec.experts: swiglu_oai needs w_gate (it is a gated activation)")
    if tuple(offsets.shape) != (E + 1,) or src.dim() != 1:
        raise MoecKernelError(f"moec.experts: offsets must be ({E + 1},) and src 1-D, got "
                              f"{tuple(offsets.shape)} and {tuple(src.shape)}")
    _same_device("experts", x, src=src, offsets=offsets)
    return roles


def _check_lora(x, weights, layout, E, F, H):
    dims = {"up": (F, H), "gate": (F, H), "down": (H, F)}     # (out N, in K) of each projection
    for p, factors in zip(layouts.PROJECTIONS, layouts.lora(weights, layout)):
        if factors is None:
            continue
        a, b, _ = factors
        N, K = dims[p]
        for name, t in ((f"lora_a_{p}", a), (f"lora_b_{p}", b)):
            _check_float("experts", name, t, dims=3)
            _same_device("experts", x, **{name: t})
            if t.dtype != x.dtype:
                raise MoecKernelError(f"moec.experts: {name} is {t.dtype} but x is {x.dtype}; cast one of them")
        r = a.shape[1]
        if tuple(a.shape) != (E, r, K) or tuple(b.shape) != (E, N, r):
            raise MoecKernelError(f"moec.experts: LoRA factors of {p} must be A (E={E}, r, {K}) and B "
                                  f"(E={E}, {N}, r) with one rank r, got {tuple(a.shape)} and {tuple(b.shape)}")


# ---------------------------------------------------------------------------------- combine


@moec_op("combine")
def combine(y: Tensor, inv: Tensor, weights: Tensor) -> Tensor:
    """y (S, H) grouped, inv (S,), weights (T, k) -> out (T, H) = sum_j w[t, j] y[inv[t*k+j]]."""
    _check_combine(y, inv, weights)
    if kernels.use_triton(y):
        from .combine_kernel import combine_launch
        out = y.new_empty(weights.shape[0], y.shape[1])
        return combine_launch(y, inv, weights, out, weights.shape[1])
    return reference.combine(y, inv, weights)


@combine.register_fake
def _(y, inv, weights):
    _check_combine(y, inv, weights)
    return y.new_empty(weights.shape[0], y.shape[1])


@moec_op("combine_backward")
def combine_backward(grad_out: Tensor, y: Tensor, inv: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    if kernels.use_triton(y):
        from .combine_backward_kernel import combine_backward_launch
        return combine_backward_launch(grad_out, y, inv, weights)
    return reference.combine_backward(grad_out, y, inv, weights)


@combine_backward.register_fake
def _(grad_out, y, inv, weights):
    return torch.empty_like(y), torch.empty_like(weights)


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_bwd(ctx, grad_out):
    y, inv, weights = ctx.saved_tensors
    grad_y, grad_w = torch.ops.moec.combine_backward(grad_out.contiguous(), y, inv, weights)
    return grad_y, None, grad_w


combine.register_autograd(_combine_bwd, setup_context=_combine_setup)


def _check_combine(y, inv, weights):
    _check_float("combine", "y", y, dims=2)
    _check_float("combine", "weights", weights, dims=2)
    _same_device("combine", y, inv=inv, weights=weights)
    if inv.dim() != 1 or inv.shape[0] != y.shape[0] or weights.shape[0] * weights.shape[1] != y.shape[0]:
        raise MoecKernelError(f"moec.combine: y {tuple(y.shape)}, inv {tuple(inv.shape)} and weights "
                              f"{tuple(weights.shape)} disagree: need y (T*k, H), inv (T*k,), weights (T, k)")


# ----------------------------------------------------------------------------------- checks


def _check_float(op, name, t, dims):
    if not isinstance(t, Tensor):
        raise MoecKernelError(f"moec.{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise MoecKernelError(f"moec.{op}: {name} has dtype {t.dtype}; moec supports "
                              f"float16, bfloat16, float32 and float64")
    if t.dim() != dims:
        raise MoecKernelError(f"moec.{op}: {name} must be {dims}-D, got shape {tuple(t.shape)}")


def _same_device(op, ref, **others):
    for name, t in others.items():
        if t.device != ref.device:
            raise MoecKernelError(f"moec.{op}: {name} is on {t.device} but the other inputs are on "
                                  f"{ref.device}; move them to one device")


def filled_grads(grads, like):
    """An op's list of gradients: an empty (0,) tensor where a gradient is None (not needed)."""
    return [g if g is not None else like.new_empty(0) for g in grads]


def fake_grads(bases, needs, like):
    """The fake impls' per-base gradients: one like each base where needed, else (0,)."""
    return [torch.empty_like(w) if need else like.new_empty(0) for w, need in zip(bases, needs)]
