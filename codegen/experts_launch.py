"""Wrappers behind `moec.experts` / `moec.experts_backward` on the Triton path: check, allocate,
launch. Shapes: x (T, H), src/inv (S,), offsets (E+1,), w_up/w_gate (E, F, H), w_down (E, H, F)
(any strides: the views of the base `weights` that codegen/layout.py builds), grad_y and y (S, H)
grouped. Never syncs with the host: every size used for a grid or an allocation is a tensor
shape; the per-expert counts stay on the device.
"""
import torch

from . import grouped_mm_forward, grouped_mm_wgrad, tuning
from . import layout as layouts
from .act_kernel import activate_rows
from .combine_kernel import combine_launch
from .dh_kernel import launch_dh
from .down_kernel import launch_down
from .errors import MoecKernelError
from .gather_kernel import gather_rows
from .gate_up_kernel import launch_gate_up
from .jit_helpers import ACTIVATION_CODE
from .wgrad_kernel import launch_wgrad

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tiles(x, src, w_up, k, *kernels):
    E, F, H = w_up.shape
    T = src.shape[0] // max(k, 1)
    return [tuning.tile(name, E, k, H, F, x.dtype, x.device, T) for name in kernels]


def _check(x):
    if x.dtype not in _KERNEL_DTYPES:
        raise MoecKernelError(f"moec.experts (triton): dtype {x.dtype} unsupported; use float16, "
                              f"bfloat16 or float32, or the reference backend")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise MoecKernelError("moec.experts (triton): x rows must be contiguous (x.stride(1) == 1)")


def experts_forward(x, src, offsets, k, weights, layout, activation, alpha, limit, save=False, pdl=False, roles=None):
    """-> (y (S, H) grouped, rows past offsets[E] zero; pre). Two launches: gate/up(+act), down.
    save: pre (S, 2F, or F without a gate) holds the pre-activations u and g, at the columns
    `grouped_mm_forward.pre_columns` says; else pre is (0,).
    LoRA adds one rank-r grouped GEMM per distinct A (t = s x A^T, t_d = s h A_down^T) and r more
    K-columns (t B^T) to each of the two; the merged weight W + s B A is never formed.
    roles: layout.views(weights, layout) where the caller has them."""
    _check(x)
    w_up, w_gate, w_down, b_up, b_gate, b_down = roles or layouts.views(weights, layout)
    lu, lg, ld = layouts.lora(weights, layout)
    S, (F, H) = src.shape[0], w_up.shape[1:]
    width = F * (1 if w_gate is None else 2)
    if S == 0:
        return x.new_empty(S, H), x.new_empty(S, width) if save else x.new_empty(0)
    t_up, t_down = _tiles(x, src, w_up, k, "gate_up", "down")
    joint = None if pdl and not save else grouped_mm_forward.gate_up_joint(x, weights, layout)
    if joint:
        pre = grouped_mm_forward.gate_up_rows(x, src, k, offsets, weights[joint[0]], joint[1])
        h = activate_rows(pre, x.new_empty(S, F), offsets, joint[3], joint[2], ACTIVATION_CODE[activation], alpha,
                          limit, True)
        pre = pre if save else x.new_empty(0)       # inference: freed before the down GEMM
    else:
        pre = x.new_empty(S, width) if save else x.new_empty(0)
        t_u, t_g = _lora_x(x, src, offsets, k, lu, lg, _shared_a(layout), t_up)
        h = x.new_empty(S, F)
        launch_gate_up(x, src, offsets, k, w_up, w_gate, b_up, b_gate, ACTIVATION_CODE[activation], alpha, limit,
                       t_up, h, lora_u=_out_term(t_u, lu), lora_g=_out_term(t_g, lg), pre=pre if save else None,
                       pdl=pdl)
    if grouped_mm_forward.down_taken(h, w_down, b_down, ld, pdl):
        return grouped_mm_forward.down_rows(h, w_down, offsets), pre
    t_d = None if ld is None else _lora_rows(h, ld[0].transpose(1, 2), ld[2], offsets, t_down)
    y = x.new_empty(S, H)
    launch_down(h, w_down.transpose(1, 2), y, offsets, t_down, bias=b_down, lr1=_out_term(t_d, ld), pdl=pdl)
    return y, pre


def experts_backward(grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit, needs=None, pre=None):
    """[dx, one gradient per base of `weights`], each base's gradient one buffer; None for a base
    with needs[i] False (a frozen weight), whose roles' GEMMs are skipped.

    1. gate/up again with dh = grad_y W_down and d(act) fused -> h, dg, du   (S, F)
       (given the forward's pre-activations pre: dh alone, dh_kernel.py's grouped mode)
    2. rows = du W_up + dg W_gate (grouped, dropped rows zero)             (S, H)
    3. dx[t] = sum of its k rows (deterministic gather-sum, no atomics)    (T, H)
    4. dW_up, dW_gate (+ biases) from du, dg against gathered x; dW_down from grad_y against h,
       each stored by the wgrad kernel straight into its strided view of its base's buffer
       (HF's gate_up halves, GPT-OSS's transposed interleaved rows): no zero-fill, no add.
    LoRA (per projection: W + s B A, in v, out gradient d): t = s v A^T and q = s d B (S, r) are
    rank-r grouped GEMMs; dv gains q A (r more K-columns in 1. and 2.), dA = q^T v, dB = d^T t.
    """
    _check(x)
    roles = layouts.views(weights, layout)
    w_up, w_gate, w_down, b_up, b_gate, b_down = roles
    lu, lg, ld = layouts.lora(weights, layout)
    S, F = src.shape[0], w_up.shape[1]
    gated = w_gate is not None
    shared = _shared_a(layout)
    # a shared A's gradient is one product (q_up + q_gate)^T x, written by lora_a_up alone
    grads, slots, out = _grad_buffers(weights, layout, needs, skip=("lora_a_gate",) if shared else ())
    if S == 0:
        for t in out.values():
            t.zero_()
        return [torch.zeros_like(x, memory_format=torch.contiguous_format)] + _finish(grads, slots, out)
    o = out.get
    t_up, t_down, t_wg, t_wg2 = _tiles(x, src, w_up, k, "gate_up_bwd", "down_dx", "wgrad", "wgrad_dual")
    t_u, t_g = _lora_x(x, src, offsets, k, lu, lg, shared, t_up)
    q_d = None if ld is None else _lora_rows(grad_y, ld[1], ld[2], offsets, t_down)
    h, du = x.new_empty(S, F), x.new_empty(S, F)
    dg = x.new_empty(S, F) if gated else None
    if _usable(pre):                 # LoRA's up/gate terms are in pre; down's is q_d A_d, in dh
        launch_dh(grad_y, src, offsets, k, w_down, None, pre, None, ACTIVATION_CODE[activation], alpha, limit,
                  _tiles(x, src, w_up, k, "dh")[0], h, dg, du, lora_d=None if ld is None else (q_d, ld[0]),
                  pre_cols=grouped_mm_forward.pre_columns(x, weights, layout, F))
    else:
        launch_gate_up(x, src, offsets, k, w_up, w_gate, b_up, b_gate, ACTIVATION_CODE[activation],
                       alpha, limit, t_up, h, grad_y=grad_y, w_down=w_down, dg=dg, du=du,
                       lora_u=_out_term(t_u, lu), lora_g=_out_term(t_g, lg),
                       lora_d=None if ld is None else (q_d, ld[0]))
    q_u = None if lu is None else _lora_rows(du, lu[1], lu[2], offsets, t_down,
                                             *((dg, lg[1]) if shared else ()))
    q_g = None if lg is None or shared else _lora_rows(dg, lg[1], lg[2], offsets, t_down)
    dx = input_grad(du, dg, w_up, w_gate, offsets, t_down, src, k, x,
                    lr1=None if lu is None else (q_u, lu[0]), lr2=None if q_g is None else (q_g, lg[0]))
    _base_wgrads(grad_y, x, src, offsets, k, h, du, dg, o, t_wg, t_wg2)
    lora_up_gate_wgrads(x, src, offsets, k, t_u, t_g, shared, du, dg, q_u, q_g, o, t_wg, t_wg2)
    if ld is not None:
        _wgrad(q_d, h, offsets, o("lora_a_down"), t_wg)
        t_d = _lora_rows(h, ld[0].transpose(1, 2), ld[2], offsets, t_down)
        _wgrad(grad_y, t_d, offsets, o("lora_b_down"), t_wg)
    return [dx] + _finish(grads, slots, out)


def experts_backward_rows(grad_y, x, src, offsets, k, weights, layout, activation, alpha, limit, pre=None):
    """Steps 1-3 of `experts_backward` alone: -> [dx (T, H), h, du, dg (S, F) grouped; dg (0,)
    without a gate]. With `experts_wgrad` on the same h, du, dg it gives what `experts_backward`
    gives, so the weight gradients can run later (under an all-to-all). No LoRA layouts (the op
    refuses them)."""
    _check(x)
    w_up, w_gate, w_down, b_up, b_gate, b_down = layouts.views(weights, layout)
    S, F = src.shape[0], w_up.shape[1]
    h, du = x.new_empty(S, F), x.new_empty(S, F)
    dg = x.new_empty(S, F) if w_gate is not None else x.new_empty(0)
    if S == 0:
        return [torch.zeros_like(x, memory_format=torch.contiguous_format), h, du, dg]
    t_up, t_dh, t_down = _tiles(x, src, w_up, k, "gate_up_bwd", "dh", "down_dx")
    gate = dg if w_gate is not None else None
    if _usable(pre):
        launch_dh(grad_y, src, offsets, k, w_down, None, pre, None, ACTIVATION_CODE[activation], alpha, limit, t_dh,
                  h, gate, du, pre_cols=grouped_mm_forward.pre_columns(x, weights, layout, F))
    else:
        launch_gate_up(x, src, offsets, k, w_up, w_gate, b_up, b_gate, ACTIVATION_CODE[activation],
                       alpha, limit, t_up, h, grad_y=grad_y, w_down=w_down, dg=gate, du=du)
    return [input_grad(du, gate, w_up, w_gate, offsets, t_down, src, k, x), h, du, dg]


def experts_wgrad(grad_y, x, src, offsets, k, h, du, dg, weights, layout, needs=None):
    """Step 4 of `experts_backward` alone, from `experts_backward_rows`' h, du, dg: one gradient
    per base of `weights` (None where needs[i] is False). du (S, 2F) with dg (0,) is
    `experts_combine_backward_rows`' dgu: the gate/up base's whole gradient is then one grouped
    GEMM (grouped_mm_wgrad.py)."""
    _check(x)
    w_up = layouts.views(weights, layout)[0]
    needs = [True] * len(weights) if needs is None else list(needs)
    joint = grouped_mm_wgrad.joint_gate_up(x, weights, layout) if du.shape[1] == 2 * w_up.shape[1] else None
    index = joint[0] if joint and needs[joint[0]] and src.shape[0] else None
    grads, slots, out = _grad_buffers(weights, layout, [n and i != index for i, n in enumerate(needs)])
    if src.shape[0] == 0:
        for t in out.values():
            t.zero_()
        return _finish(grads, slots, out)
    t_wg, t_wg2 = _tiles(x, src, w_up, k, "wgrad", "wgrad_dual")
    if joint is None:
        _base_wgrads(grad_y, x, src, offsets, k, h, du, dg if dg.numel() else None, out.get, t_wg, t_wg2)
        return _finish(grads, slots, out)
    if index is not None:
        grads[index] = grouped_mm_wgrad.gate_up_wgrad(du, gather_rows(x, src, k), offsets, joint[1])
    _wgrad(grad_y, h, offsets, out.get("w_down"), t_wg, db=out.get("b_down"))
    return _finish(grads, slots, out)


def _usable(pre) -> bool:
    """Whether the backward can read the forward's pre-activations instead of recomputing them:
    given (not None, not the empty stand-in)."""
    return pre is not None and pre.numel() > 0


def lora_up_gate_wgrads(x, src, offsets, k, t_u, t_g, shared, du, dg, q_u, q_g, o, t_wg, t_wg2):
    """The up/gate LoRA factors' gradients: dA = q^T x[src // k] (gathered), dB = d^T t with
    t = s x[src // k] A^T (`_lora_x`; None where the projection has no LoRA)."""
    _wgrad(q_u, x, offsets, o("lora_a_up"), t_wg, t_wg2, src=src, k=k, a2=q_g, out2=o("lora_a_gate"))
    if shared:
        _wgrad(du, t_u, offsets, o("lora_b_up"), t_wg, t_wg2, a2=dg, out2=o("lora_b_gate"))
        return
    if t_u is not None:
        _wgrad(du, t_u, offsets, o("lora_b_up"), t_wg)
    if t_g is not None:
        _wgrad(dg, t_g, offsets, o("lora_b_gate"), t_wg)


def _grad_buffers(weights, layout, needs, skip=()):
    """(grads: one buffer per base with its strides, None where not needed; slots: each role's
    view of its base's buffer; out: where each role's kernel writes, a slot or a temporary)."""
    parsed = layouts.parse(layout)
    needs = [True] * len(weights) if needs is None else list(needs)
    grads = [torch.empty_like(w) if need else None for w, need in zip(weights, needs)]
    dims = tuple((w.shape[1], w.shape[2] if w.dim() == 3 else 0) for w in weights)
    zero, accumulate = layouts.grad_plan(layout, dims, skip)
    for i in zero:
        if grads[i] is not None:
            grads[i].zero_()
    slots = {role: layouts.view(grads[v.index], v) for role, v in parsed.items()
             if needs[v.index] and role not in skip}
    # a role overlapping an earlier one of the same base (not produced by moec's rewrite) writes a
    # temporary that is added at the end
    out = {role: torch.empty_like(t, memory_format=torch.contiguous_format) if role in accumulate else t
           for role, t in slots.items()}
    return grads, slots, out


def _base_wgrads(grad_y, x, src, offsets, k, h, du, dg, o, t_wg, t_wg2):
    """dW_up, dW_gate (+ biases) from du, dg against gathered x; dW_down (+ bias) from grad_y
    against h. The wgrad kernel writes every element of its outputs (zeros for experts without
    rows)."""
    _wgrad(du, x, offsets, o("w_up"), t_wg, t_wg2, src=src, k=k, a2=dg, out2=o("w_gate"), db=o("b_up"),
           db2=o("b_gate"))
    _wgrad(grad_y, h, offsets, o("w_down"), t_wg, db=o("b_down"))


def _shared_a(layout) -> bool:
    """Whether gate's LoRA reads up's A with up's scale (PEFT on a fused gate_up): one t serves both."""
    parsed, scales = layouts.parse(layout), layouts.lora_scales(layout)
    a = parsed.get("lora_a_up")
    return a is not None and a == parsed.get("lora_a_gate") and scales["up"] == scales["gate"]


def _lora_x(x, src, offsets, k, lu, lg, shared, tile):
    """t = s x[src // k] A^T (S, r) for up and gate: one grouped GEMM (a plain gate_up launch)
    each, or one for both when they share A."""
    def lowrank(factors):
        a, _, scale = factors
        t = x.new_empty(src.shape[0], a.shape[1])
        launch_gate_up(x, src, offsets, k, a, None, None, None, ACTIVATION_CODE["none"], 0.0, 0.0, tile, t)
        return t.mul_(scale)
    t_u = None if lu is None else lowrank(lu)
    t_g = t_u if shared else None if lg is None else lowrank(lg)
    return t_u, t_g


def _lora_rows(a1, b1, scale, offsets, tile, a2=None, b2=None):
    """s (a1 b1[e] [+ a2 b2[e]]) (S, r) over contiguous grouped rows, b (E, K, r)."""
    t = a1.new_empty(a1.shape[0], b1.shape[2])
    launch_down(a1, b1, t, offsets, tile, a2=a2, b2=b2)
    return t.mul_(scale)


def _out_term(t, factors):
    """(t, B^T as (E, r, N)): a LoRA term t B^T added to a projection's output."""
    return None if factors is None else (t, factors[1].transpose(1, 2))


def _wgrad(a, b, offsets, out, tile, tile_dual=None, src=None, k=1, a2=None, out2=None, db=None, db2=None):
    """launch_wgrad for the wanted gradients only (None: a frozen base, or no such role); both
    pairs (a, out, db), (a2, out2, db2) in one pass over b when both are wanted."""
    # `is None`, not `(w, d) != (None, None)`: that compares tensors with None (~90 us a call)
    pairs = [(t, w, d) for t, w, d in ((a, out, db), (a2, out2, db2))
             if t is not None and not (w is None and d is None)]
    for t, w, d in pairs:
        if w is None:    # a bias that trains beside a frozen weight: its per-expert row sums
            d.copy_(_segment_sum(t, offsets, d.shape[0]))
    pairs = [p for p in pairs if p[1] is not None]
    if len(pairs) == 2:
        (a, out, db), (a2, out2, db2) = pairs
        launch_wgrad(a, b, offsets, out, tile_dual or tile, src=src, k=k, a2=a2, out2=out2, db=db, db2=db2)
    elif pairs:
        (a, out, db), = pairs
        launch_wgrad(a, b, offsets, out, tile, src=src, k=k, db=db)


def _segment_sum(a_SM, offsets, E):
    """(E, M) sums of the grouped rows of each expert, without a host sync."""
    S = a_SM.shape[0]
    expert = torch.searchsorted(offsets[1:], torch.arange(S, device=a_SM.device), right=True)   # E past the end
    sums = torch.zeros(E + 1, a_SM.shape[1], dtype=torch.float32, device=a_SM.device)
    return sums.index_add_(0, expert, a_SM.float())[:E]


def _finish(grads, slots, out):
    for role, t in out.items():
        if t is not slots[role]:
            slots[role].add_(t)
    return grads


def input_grad(du, dg, w_up, w_gate, offsets, tile, src, k, x, lr1=None, lr2=None, inv=None):
    """dx (T, H): rows = du W_up + dg W_gate (+ LoRA terms) grouped (S, H), then each token's k rows
    summed. The rows are freed on return, before the weight gradients gather their own (S, H)
    copies: a caller holding them would add S x H to the backward's peak."""
    rows = x.new_empty(src.shape[0], x.shape[1])
    launch_down(du, w_up, rows, offsets, tile, a2=dg, b2=w_gate, lr1=lr1, lr2=lr2)
    return sum_rows(rows, src, k, x, inv)


def sum_rows(rows_SH, src_S, k, x_TH, inv=None):
    """dx[t] = sum_j rows[inv[t*k + j]] (inv: the plan's, or rebuilt from src); falls back to
    index_add when copies are not T*k."""
    T = x_TH.shape[0]
    if src_S.shape[0] != T * k:
        dx = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        return dx.index_add_(0, src_S // k, rows_SH.float()).to(x_TH.dtype)
    if inv is None:
        inv = torch.empty_like(src_S).scatter_(0, src_S, torch.arange(src_S.shape[0], device=src_S.device))
    return combine_launch(rows_SH, inv, None, torch.empty_like(x_TH, memory_format=torch.contiguous_format), k)
