"""Wrappers behind `moec.experts` / `moec.experts_backward` on the Triton path: check, allocate,
launch. Shapes: x (T, H), src/inv (S,), offsets (E+1,), w_up/w_gate (E, F, H), w_down (E, H, F)
(any strides: the views of the base `weights` that codegen/layout.py builds), grad_y and y (S, H)
grouped. Never syncs with the host: every size used for a grid or an allocation is a tensor
shape; the per-expert counts stay on the device.
"""
import torch

from . import layout as layouts
from . import tuning
from .combine_kernel import combine_launch
from .down_kernel import launch_down
from .errors import MoecKernelError
from .gate_up_kernel import launch_gate_up
from .jit_helpers import ACTIVATION_CODE
from .wgrad_kernel import launch_wgrad

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tiles(x, src, w_up, k, *kernels):
    E, F, H = w_up.shape
    T = src.shape[0] // max(k, 1)
    return [tuning.tile(name, E, k, H, F, x.dtype, x.device, T) for name in kernels]


def _check(x, layout):
    if layouts.lora_scales(layout):
        raise MoecKernelError("moec.experts (triton): LoRA factors are not on the Triton path yet; "
                              "use the reference backend (moec.codegen.kernels.set_backend('reference'))")
    if x.dtype not in _KERNEL_DTYPES:
        raise MoecKernelError(f"moec.experts (triton): dtype {x.dtype} unsupported; use float16, "
                              f"bfloat16 or float32, or the reference backend")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise MoecKernelError("moec.experts (triton): x rows must be contiguous (x.stride(1) == 1)")


def experts_forward(x, src, offsets, k, weights, layout, activation, alpha, limit):
    """-> y (S, H) grouped, rows past offsets[E] zero. Two launches: gate/up(+act), down."""
    _check(x, layout)
    w_up, w_gate, w_down, b_up, b_gate, b_down = layouts.views(weights, layout)
    S, (E, F, H) = src.shape[0], w_up.shape
    y = x.new_empty(S, H)
    if S == 0:
        return y
    t_up, t_down = _tiles(x, src, w_up, k, "gate_up", "down")
    h = x.new_empty(S, F)
    launch_gate_up(x, src, offsets, k, w_up, w_gate, b_up, b_gate, ACTIVATION_CODE[activation],
                   alpha, limit, t_up, h)
    launch_down(h, w_down.transpose(1, 2), y, offsets, t_down, bias=b_down)
    return y


def experts_backward(grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit, needs=None):
    """[dx, one gradient per base of `weights`], each base's gradient one buffer.

    1. gate/up again with dh = grad_y W_down and d(act) fused -> h, dg, du   (S, F)
    2. rows = du W_up + dg W_gate (grouped, dropped rows zero)             (S, H)
    3. dx[t] = sum of its k rows (deterministic gather-sum, no atomics)    (T, H)
    4. dW_up, dW_gate (+ biases) from du, dg against gathered x; dW_down from grad_y against h,
       each stored by the wgrad kernel straight into its strided view of its base's buffer
       (HF's gate_up halves, GPT-OSS's transposed interleaved rows): no zero-fill, no add.
    """
    _check(x, layout)
    roles = layouts.views(weights, layout)
    w_up, w_gate, w_down, b_up, b_gate, b_down = roles
    S, (E, F, H) = src.shape[0], w_up.shape
    gated = w_gate is not None
    grads = [torch.empty_like(w) for w in weights]     # the base's strides: the fake impl's too
    dims = tuple((w.shape[1], w.shape[2] if w.dim() == 3 else 0) for w in weights)
    zero, accumulate = layouts.grad_plan(layout, dims)
    for i in zero:
        grads[i].zero_()
    slots = layouts.views(grads, layout)
    # a role overlapping an earlier one of the same base (not produced by moec's rewrite) writes a
    # temporary that is added at the end
    out = [torch.empty_like(t, memory_format=torch.contiguous_format) if r in accumulate else t
           for r, t in zip(layouts.ROLES, slots)]
    if S == 0:
        for t in out:
            if t is not None:
                t.zero_()
        return [torch.zeros_like(x, memory_format=torch.contiguous_format)] + _finish(grads, slots, out)
    dw_up, dw_gate, dw_down, db_up, db_gate, db_down = out
    t_up, t_down, t_wg, t_wg2 = _tiles(x, src, w_up, k, "gate_up_bwd", "down_dx", "wgrad", "wgrad_dual")
    h, du = x.new_empty(S, F), x.new_empty(S, F)
    dg = x.new_empty(S, F) if gated else None
    launch_gate_up(x, src, offsets, k, w_up, w_gate, b_up, b_gate, ACTIVATION_CODE[activation],
                   alpha, limit, t_up, h, grad_y=grad_y, w_down=w_down, dg=dg, du=du)
    rows = x.new_empty(S, H)
    launch_down(du, w_up, rows, offsets, t_down, a2=dg, b2=w_gate)
    dx = _sum_rows(rows, src, k, x)
    # the wgrad kernel writes every element of its outputs (zeros for experts without rows)
    launch_wgrad(du, x, offsets, dw_up, t_wg2 if gated else t_wg, src=src, k=k, a2=dg, out2=dw_gate,
                 db=db_up, db2=db_gate)
    launch_wgrad(grad_y, h, offsets, dw_down, t_wg, db=db_down)
    grads = _finish(grads, slots, out)
    return [dx] + [g if needs is None or need else None for g, need in zip(grads, needs or grads)]


def _finish(grads, slots, out):
    for slot, t in zip(slots, out):
        if t is not slot:
            slot.add_(t)
    return grads


def _sum_rows(rows_SH, src_S, k, x_TH):
    """dx[t] = sum_j rows[inv[t*k + j]]; falls back to index_add when copies are not T*k."""
    T = x_TH.shape[0]
    if src_S.shape[0] != T * k:
        dx = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        return dx.index_add_(0, src_S // k, rows_SH.float()).to(x_TH.dtype)
    inv = torch.empty_like(src_S).scatter_(0, src_S, torch.arange(src_S.shape[0], device=src_S.device))
    return combine_launch(rows_SH, inv, None, torch.empty_like(x_TH, memory_format=torch.contiguous_format), k)
