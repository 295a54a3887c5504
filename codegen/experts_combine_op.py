"""`torch.ops.moec.experts_combine`: `combine(experts(...))` as one op (passes/fuse_combine.py emits
it where the experts' output feeds only the combine: every graph without expert parallelism).

Why one op: autograd then saves what the fused backward needs (x, the pre-activations u | g, the
routing), not y (S, H), which combine's own backward keeps for the routing weights' gradient, and
the backward reads the pre-activations instead of recomputing two GEMMs (experts_combine_launch.py).
With save=False (inference graphs) nothing is kept and pre is an empty (0,) tensor.
"""
import torch
from torch import Tensor

from . import grouped_mm_wgrad, kernels, reference
from . import layout as layouts
from .dispatch import moec_op
from .errors import MoecKernelError
from .ops import _check_experts, _check_float, _same_device, fake_grads, filled_grads, saved_preactivations


@moec_op("experts_combine")
def experts_combine(x: Tensor, src: Tensor, offsets: Tensor, inv: Tensor, route_w: Tensor, k: int,
                    bases: list[Tensor], layout: str, activation: str, alpha: float, limit: float,
                    save: bool) -> tuple[Tensor, Tensor]:
    """x (T, H), grouped copies src / inv (S = T*k,) by offsets (E+1,), routing weights route_w
    (T, k) -> (out (T, H) = sum_j route_w[t, j] experts(x)[inv[t*k + j]], pre): pre (S, 2F) holds
    the pre-activations u and g (S, F without a gate; columns: grouped_mm_forward.pre_columns) when `save`,
    else it is empty (0,)."""
    roles = _check(x, src, offsets, inv, route_w, k, bases, layout, activation)
    if kernels.use_triton(x):
        from .experts_combine_launch import experts_combine_forward
        return experts_combine_forward(x, src, offsets, inv, route_w, k, bases, layout, activation, alpha, limit,
                                       save, roles)
    return reference.experts_combine(x, src, offsets, inv, route_w, k, bases, layout, activation, alpha, limit,
                                     save)


@experts_combine.register_fake
def _(x, src, offsets, inv, route_w, k, bases, layout, activation, alpha, limit, save):
    _check(x, src, offsets, inv, route_w, k, bases, layout, activation)
    pre = x.new_empty(src.shape[0], layouts.preactivation_width(bases, layout)) if save else x.new_empty(0)
    return x.new_empty(route_w.shape[0], x.shape[1]), pre


@moec_op("experts_combine_backward")
def experts_combine_backward(grad_out: Tensor, x: Tensor, src: Tensor, offsets: Tensor, inv: Tensor,
                             route_w: Tensor, pre: Tensor, k: int, bases: list[Tensor], layout: str,
                             activation: str, alpha: float, limit: float, needs: list[bool]) -> list[Tensor]:
    """[dx (T, H), d route_w (T, k), one gradient per base of `bases`] (an empty (0,) tensor for a
    base with needs[i] False). pre: `experts_combine`'s saved pre-activations, or (0,)."""
    if kernels.use_triton(x):
        from .experts_combine_launch import experts_combine_backward as launch
        grads = launch(grad_out, x, src, offsets, inv, route_w, pre, k, bases, layout, activation, alpha, limit,
                       needs)
    else:
        grads = reference.experts_combine_backward(grad_out, x, src, offsets, inv, route_w, k, bases, layout,
                                                   activation, alpha, limit, needs)
    return filled_grads(grads, x)


@experts_combine_backward.register_fake
def _(grad_out, x, src, offsets, inv, route_w, pre, k, bases, layout, activation, alpha, limit, needs):
    return [torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(route_w, memory_format=torch.contiguous_format)] + \
        fake_grads(bases, needs, x)


@moec_op("experts_combine_backward_rows")
def experts_combine_backward_rows(grad_out: Tensor, x: Tensor, src: Tensor, offsets: Tensor, inv: Tensor,
                                  route_w: Tensor, pre: Tensor, k: int, bases: list[Tensor], layout: str,
                                  activation: str, alpha: float, limit: float) -> list[Tensor]:
    """The backward's first op where it is three (`_backward`): [dx, d route_w, w h, du, dg (S, F)
    grouped; dg (0,) without a gate], what the weight gradients' ops (`experts_wgrad` for gate/up,
    `experts_down_wgrad`) read. pre: `experts_combine`'s saved pre-activations, or (0,)."""
    if any(f is not None for f in layouts.lora(bases, layout)):
        raise MoecKernelError(f"moec.experts_combine_backward_rows: layout {layout!r} has LoRA factors, whose "
                              "gradients read the rows' LoRA terms: use moec.experts_combine_backward")
    if kernels.use_triton(x):
        from .experts_combine_launch import experts_combine_backward_rows as launch
        return launch(grad_out, x, src, offsets, inv, route_w, pre, k, bases, layout, activation, alpha, limit)
    return reference.experts_combine_backward_rows(grad_out, x, src, offsets, inv, route_w, k, bases, layout,
                                                   activation, alpha, limit)


@experts_combine_backward_rows.register_fake
def _(grad_out, x, src, offsets, inv, route_w, pre, k, bases, layout, activation, alpha, limit):
    S, F = src.shape[0], layouts.views(bases, layout)[0].shape[1]
    gated = "w_gate" in layouts.parse(layout)
    head = [torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(route_w, memory_format=torch.contiguous_format), x.new_empty(S, F)]
    if kernels.use_triton(x) and grouped_mm_wgrad.joint_gate_up(x, bases, layout):
        return head + [x.new_empty(S, 2 * F), x.new_empty(0)]      # dgu (the launch's docstring)
    return head + [x.new_empty(S, F), x.new_empty(S, F) if gated else x.new_empty(0)]


@moec_op("experts_down_wgrad")
def experts_down_wgrad(grad_out: Tensor, hw: Tensor, src: Tensor, offsets: Tensor, route_w: Tensor, k: int,
                       bases: list[Tensor], layout: str, needs: list[bool]) -> list[Tensor]:
    """The backward's last op: one gradient per base of `needs` (bases only the down projection
    reads) from grad_out and `experts_combine_backward_rows`' w h."""
    if kernels.use_triton(hw):
        from .experts_combine_launch import down_weight_grads
        grads = down_weight_grads(grad_out, hw, src, offsets, k, route_w, bases, layout, needs)
    else:
        grads = reference.down_weight_grads(grad_out, hw, src, offsets, k, route_w, bases, layout, needs)
    return filled_grads(grads, hw)


@experts_down_wgrad.register_fake
def _(grad_out, hw, src, offsets, route_w, k, bases, layout, needs):
    return fake_grads(bases, needs, hw)


def _setup(ctx, inputs, output):
    x, src, offsets, inv, route_w, k, bases, layout, activation, alpha, limit, _save = inputs
    ctx.save_for_backward(x, src, offsets, inv, route_w, output[1], *bases)
    saved_preactivations(ctx, output[1])
    ctx.args = (k, layout, activation, alpha, limit)
    ctx.needs = [w.requires_grad for w in bases]


# False: the backward is always one op (benchmarks/backward_ab.py times both ways)
SPLIT_BACKWARD = True


def _backward(ctx, grad_out, _grad_pre):
    x, src, offsets, inv, route_w, pre, *bases = ctx.saved_tensors
    k, layout, activation, alpha, limit = ctx.args
    grad_out = grad_out.contiguous()
    phases = layouts.split_phases(bases, layout, ctx.needs) if SPLIT_BACKWARD else None
    if phases is None:
        g = torch.ops.moec.experts_combine_backward(grad_out, x, src, offsets, inv, route_w, pre, k, bases, layout,
                                                    activation, alpha, limit, ctx.needs)
        dx, d_route_w, grads = g[0], g[1], g[2:]
    else:
        # Three ops, so that a compiled backward frees pre (S x 2F) after the first, before any
        # weight gradient: each makes its (E, ., .) buffer and a gathered (S, H) copy of x or
        # grad_out, where the step peaks. Inside one op the caller's reference kept pre alive to its
        # end (OLMoE, 8192 tokens, H100: 1508 MiB with pre beside the gate/up weight gradient, 1257
        # as three ops, HF compiled 1346). du and dg go as the gate/up op, their last reader, returns.
        down, first = phases
        dx, d_route_w, hw, du, dg = torch.ops.moec.experts_combine_backward_rows(
            grad_out, x, src, offsets, inv, route_w, pre, k, bases, layout, activation, alpha, limit)
        none = x.new_empty(0)
        g1 = torch.ops.moec.experts_wgrad(none, x, src, offsets, k, none, du, dg, bases, layout, first) \
            if any(first) else [None] * len(bases)
        del du, dg      # eager autograd: not beside the down projection's weight gradient either
        g2 = torch.ops.moec.experts_down_wgrad(grad_out, hw, src, offsets, route_w, k, bases, layout, down)
        grads = [a if f else b for a, b, f in zip(g1, g2, first)]
    grads = [t if need else None for t, need in zip(grads, ctx.needs)]
    return dx, None, None, None, d_route_w, None, grads, None, None, None, None, None


experts_combine.register_autograd(_backward, setup_context=_setup)


def _check(x, src, offsets, inv, route_w, k, bases, layout, activation):
    """-> the role views (ops._check_experts)."""
    roles = _check_experts(x, src, offsets, bases, layout, activation)
    _check_float("experts_combine", "route_w", route_w, dims=2)
    _same_device("experts_combine", x, inv=inv, route_w=route_w)
    T, S = x.shape[0], src.shape[0]
    if tuple(route_w.shape) != (T, k) or inv.dim() != 1 or inv.shape[0] != S or T * k != S:
        raise MoecKernelError(f"moec.experts_combine: x {tuple(x.shape)}, src {tuple(src.shape)}, inv "
                              f"{tuple(inv.shape)} and route_w {tuple(route_w.shape)} disagree: need x (T, H), "
                              f"src and inv (T*k,), route_w (T, k) with k={k}")
    return roles
