"""Wrappers behind `moec.experts_combine` / `moec.experts_combine_backward` on the Triton path:
the experts and the combine as one autograd op, so that training saves the pre-activations
(S, 2F) instead of recomputing them and never keeps y (S, H) for the router's gradient.

Forward: gate/up (+act, storing pre = u and g when saving, at grouped_mm_forward.pre_columns), down -> y (S, H),
combine -> out (T, H).
Backward (SonicMoE's order; see dh_kernel.py):
    1. dh kernel: d = grad_out[t] W_down[e] gathered by token; from pre: h, dg, du, w h and the
       routing weights' gradient <d, h> (+ bias term)                             (S, F), (S,)
    2. rows = du W_up + dg W_gate (grouped); dx[t] = sum of its k rows           (S, H) -> (T, H)
    3. dW_up, dW_gate (+ biases) from du, dg against gathered x; dW_down from grad_out gathered
       by token against w h, b_down from w-weighted grad_out rows.
LoRA (per projection W + s B A): the gate/up terms are in pre; down's adds q A in step 1, with q = s
grad_out[t] B (S, r) gathered by token like x (unweighted: the dh kernel weighs d by w after); the
factors' gradients as experts_backward takes them, w folded in where grad_y would carry it:
dA_down = q^T (w h), dB_down = grad_out[t]^T (s (w h) A^T).
Never syncs with the host (experts_launch.py's rules).
"""
from types import SimpleNamespace

import torch

from . import decode_fused, grouped_mm_forward, grouped_mm_wgrad, streams
from . import layout as layouts
from .combine_kernel import combine_launch
from .decode_experts_kernel import decode_experts_launch
from .dh_kernel import launch_dh
from .experts_launch import (_check, _finish, _grad_buffers, _lora_rows, _lora_x, _shared_a, _tiles, _wgrad,
                             experts_forward, input_grad, lora_up_gate_wgrads, sum_rows)
from .gather_kernel import gather_rows
from .jit_helpers import ACTIVATION_CODE
from .pdl import use as use_pdl
from .wgrad_kernel import bias_grads, launch_wgrad


def experts_combine_forward(x, src, offsets, inv, route_w, k, weights, layout, activation, alpha, limit, save,
                            roles=None):
    """-> (out (T, H), pre (S, 2F or F) when saving, else (0,)). roles: the weights' views, where
    the caller has them."""
    pdl = not save and use_pdl(x, x.shape[0])       # decode: codegen/pdl.py
    roles = roles or layouts.views(weights, layout)
    if not save and src.shape[0] and decode_fused.use(x, x.shape[0], layouts.has_lora(layout), roles):
        _check(x)
        out = x.new_empty(route_w.shape[0], x.shape[1])
        decode_experts_launch(x, src, offsets, inv, route_w, k, roles, ACTIVATION_CODE[activation], alpha, limit,
                              out, decode_fused.settings(x), pdl)
        return out, x.new_empty(0)
    y, pre = experts_forward(x, src, offsets, k, weights, layout, activation, alpha, limit, save, pdl, roles=roles)
    return combine_launch(y, inv, route_w, x.new_empty(route_w.shape[0], x.shape[1]), k, pdl=pdl), pre


def experts_combine_backward(grad_out, x, src, offsets, inv, route_w, pre, k, weights, layout, activation, alpha,
                             limit, needs=None):
    """[dx (T, H), d route_w (T, k), one gradient per base of `weights`] (None where needs[i] is
    False). pre: the forward's saved pre-activations, or (0,) to recompute them here."""
    _check(x)
    w_up = layouts.views(weights, layout)[0]
    skip = ("lora_a_gate",) if _shared_a(layout) else ()
    if src.shape[0] == 0:
        grads, slots, out = _grad_buffers(weights, layout, needs, skip)
        for t in out.values():
            t.zero_()
        return _zero_head(x, route_w) + _finish(grads, slots, out)
    r = _rows(grad_out, x, src, offsets, inv, route_w, pre, k, weights, layout, activation, alpha, limit)
    t_wg, t_wg2 = _tiles(x, src, w_up, k, "wgrad", "wgrad_dual")
    rows = {"hw": r.hw, "du": r.du, "dg": r.dg}    # handed over: _weight_grads frees each once read for the last time
    lora = (r.q_d, r.q_u, r.q_g)
    with streams.beside(x.device, (r.go, r.hw, r.du, r.dg, x, src, offsets, route_w) + lora + tuple(weights)) as made:
        head, go, t_down, t_up = r.head, r.go, r.t_down, r.t_up
        del r
        grads = _weight_grads(go, x, rows, src, offsets, k, route_w, weights, layout, needs, skip, lora, t_down,
                              t_wg, t_wg2, t_up)
        made += grads
    return head + grads


def experts_combine_backward_rows(grad_out, x, src, offsets, inv, route_w, pre, k, weights, layout, activation,
                                  alpha, limit):
    """The backward without its weight gradients (ops of their own, so that a compiled backward
    frees pre before them: see experts_combine_op.py): [dx, d route_w, w h, du, dg (S, F); dg (0,)
    without a gate]. Where `grouped_mm_wgrad.joint_gate_up` holds, [.., w h, dgu (S, 2F): dg and du
    side by side in the gate/up base's column order, (0,)]. No LoRA layouts (their factors'
    gradients need the rows' LoRA terms)."""
    _check(x)
    w_up, w_gate = layouts.views(weights, layout)[:2]
    joint = grouped_mm_wgrad.joint_gate_up(x, weights, layout)
    if src.shape[0] == 0:
        F = w_up.shape[1]
        return _zero_head(x, route_w) + [x.new_empty(0, F)] + (
            [x.new_empty(0, 2 * F), x.new_empty(0)] if joint else
            [x.new_empty(0, F), x.new_empty(0, F) if w_gate is not None else x.new_empty(0)])
    r = _rows(grad_out, x, src, offsets, inv, route_w, pre, k, weights, layout, activation, alpha, limit, joint)
    if joint:
        return r.head + [r.hw, r.dgu, x.new_empty(0)]
    return r.head + [r.hw, r.du, r.dg if r.dg is not None else x.new_empty(0)]


def _zero_head(x, route_w):
    return [torch.zeros_like(x, memory_format=torch.contiguous_format),
            torch.zeros_like(route_w, memory_format=torch.contiguous_format)]


def _rows(grad_out, x, src, offsets, inv, route_w, pre, k, weights, layout, activation, alpha, limit, joint=None):
    """Steps 1 and 2 (S > 0): head = [dx, d route_w], the rows the weight gradients read (hw, du,
    dg: None without a gate), grad_out contiguous (go), LoRA's q terms and the tiles they reuse.
    joint: `grouped_mm_wgrad.joint_gate_up`'s, where du and dg go side by side into one buffer
    (dgu) and the input gradient's rows are CUTLASS's grouped GEMM of it."""
    w_up, w_gate, w_down, b_up, b_gate, b_down = layouts.views(weights, layout)
    lu, lg, ld = layouts.lora(weights, layout)
    shared = _shared_a(layout)
    S, F = src.shape[0], w_up.shape[1]
    if pre.numel() == 0:    # called without saved pre-activations (save=False under autograd)
        _, pre = experts_combine_forward(x, src, offsets, inv, route_w, k, weights, layout, activation, alpha,
                                         limit, True)
    t_dh, t_down, t_up = _tiles(x, src, w_up, k, "dh", "down_dx", "gate_up")
    hw, dgu = x.new_empty(S, F), None
    if joint:
        dgu = x.new_empty(S, 2 * F)
        dg, du = dgu[:, joint[2]:joint[2] + F], dgu[:, joint[3]:joint[3] + F]
    else:
        du, dg = x.new_empty(S, F), x.new_empty(S, F) if w_gate is not None else None
    go = grad_out.contiguous()
    # down's LoRA: q = s grad_out[t] B, gathered by token as _lora_x gathers x (B^T read as (E, r, H))
    q_d = None if ld is None else _lora_x(go, src, offsets, k, (ld[1].transpose(1, 2), None, ld[2]), None, False,
                                          t_up)[0]
    dw_rows = launch_dh(go, src, offsets, k, w_down, b_down, pre, route_w, ACTIVATION_CODE[activation], alpha,
                        limit, t_dh, hw, dg, du, lora_d=None if ld is None else (q_d, ld[0]),
                        pre_cols=grouped_mm_forward.pre_columns(x, weights, layout, F))
    d_route_w = torch.empty(S, dtype=torch.float32, device=x.device).index_copy_(0, src, dw_rows)
    q_u = None if lu is None else _lora_rows(du, lu[1], lu[2], offsets, t_down, *((dg, lg[1]) if shared else ()))
    q_g = None if lg is None or shared else _lora_rows(dg, lg[1], lg[2], offsets, t_down)
    if joint:
        dx = sum_rows(grouped_mm_wgrad.input_rows(dgu, weights[joint[0]], offsets, joint[1]), src, k, x, inv)
    else:
        dx = input_grad(du, dg, w_up, w_gate, offsets, t_down, src, k, x, inv=inv,
                        lr1=None if lu is None else (q_u, lu[0]), lr2=None if q_g is None else (q_g, lg[0]))
    return SimpleNamespace(head=[dx, d_route_w.view(route_w.shape).to(route_w.dtype)], hw=hw, du=du, dg=dg, dgu=dgu,
                           go=go, q_d=q_d, q_u=q_u, q_g=q_g, t_down=t_down, t_up=t_up)


def down_weight_grads(grad_out, hw, src, offsets, k, route_w, weights, layout, needs):
    """The down projection's weight gradients (one per base of `weights`, None where needs[i] is
    False; needs asks only for bases the down projection alone reads, no LoRA) from
    `experts_combine_backward_rows`' w h (the gate/up ones: `experts_wgrad` from its du, dg)."""
    _check(hw)
    whole = grouped_mm_wgrad.whole_base(hw, weights, layout, needs) if src.shape[0] else None
    if whole is not None:
        return _down_wgrad_grouped_mm(grad_out, hw, src, offsets, k, route_w, weights, layout, needs, *whole)
    grads, slots, out = _grad_buffers(weights, layout, needs)
    t_wg, = _tiles(hw, src, layouts.views(weights, layout)[0], k, "wgrad")
    with streams.beside(hw.device, (grad_out, hw, src, offsets, route_w) + tuple(weights)) as made:
        _down_wgrad(grad_out.contiguous(), hw, src, offsets, k, route_w, out.get("w_down"), out.get("b_down"), t_wg)
        made += [g for g in grads if g is not None]
    return _finish(grads, slots, out)


def _down_wgrad_grouped_mm(grad_out, hw, src, offsets, k, route_w, weights, layout, needs, index, transposed):
    """down_weight_grads through torch._grouped_mm (grouped_mm_wgrad.py): the down base's gradient
    is its result; b_down's, where it trains, from the same gathered rows, weighted by route_w."""
    rest = [need and i != index for i, need in enumerate(needs)]
    grads, slots, out = _grad_buffers(weights, layout, rest)
    with streams.beside(hw.device, (grad_out, hw, src, offsets, route_w) + tuple(weights)) as made:
        go_rows = gather_rows(grad_out.contiguous(), src, k)
        grads[index] = grouped_mm_wgrad.down_wgrad(go_rows, hw, offsets, transposed)
        E, H, F = offsets.shape[0] - 1, go_rows.shape[1], hw.shape[1]
        bias_grads(go_rows, None, offsets, out.get("b_down"), None, src, route_w.contiguous(), 0, True, (E, H, F))
        made += [g for g in grads if g is not None]
    return _finish(grads, slots, out)


def _weight_grads(go, x, rows, src, offsets, k, route_w, weights, layout, needs, skip, lora, t_down, t_wg, t_wg2,
                  t_up):
    """One gradient per base of `weights` (None where not needed). rows: {"hw", "du", "dg"}, emptied
    here; lora: _rows' (q_d, q_u, q_g). The gradients are made phase by phase, each buffer just before its kernels: dW_up |
    dW_gate first, against the copy of x their kernel gathers; then, du and dg freed, dW_down
    against the copy of grad_out its kernel gathers. Down first kept du and dg (2 x S x F) alive
    beside dW_down's buffer at the backward's peak (48 MiB more at Qwen3 widths, 4096 tokens)."""
    lu, lg, ld = layouts.lora(weights, layout)
    q_d, q_u, q_g = lora
    shared = _shared_a(layout)
    du, dg = rows.pop("du"), rows.pop("dg")
    down_only, first = layouts.phases(weights, layout, needs)
    grads1, slots1, out1 = _grad_buffers(weights, layout, first, skip)
    o = out1.get
    _wgrad(du, x, offsets, o("w_up"), t_wg, t_wg2, src=src, k=k, a2=dg, out2=o("w_gate"), db=o("b_up"),
           db2=o("b_gate"))
    if lu is not None or lg is not None:     # t = s x[t] A^T recomputed: rank r, cheap
        t_u, t_g = _lora_x(x, src, offsets, k, lu, lg, shared, t_up)
        lora_up_gate_wgrads(x, src, offsets, k, t_u, t_g, shared, du, dg, q_u, q_g, o, t_wg, t_wg2)
        del t_u, t_g
    del du, dg
    hw = rows.pop("hw")
    grads2, slots2, out2 = _grad_buffers(weights, layout, down_only, skip)
    o = lambda role: out2.get(role, out1.get(role))      # a base both sides read has its buffer from the first
    _down_wgrad(go, hw, src, offsets, k, route_w, o("w_down"), o("b_down"), t_wg)
    if ld is not None:
        _wgrad(q_d, hw, offsets, o("lora_a_down"), t_wg)
        t_d = _lora_rows(hw, ld[0].transpose(1, 2), ld[2], offsets, t_down)     # s (w h) A^T
        _down_wgrad(go, t_d, src, offsets, k, route_w, o("lora_b_down"), None, t_wg)
    return [a if a is not None else b for a, b in zip(_finish(grads1, slots1, out1), _finish(grads2, slots2, out2))]


def _down_wgrad(go, hw, src, offsets, k, route_w, dw, db, tile):
    """dW_down[e] = sum over e's rows of grad_out[t]^T (w h) (E, H, F); b_down's gradient from the
    w-weighted grad_out rows. db alone (a bias training beside a frozen W_down) takes the same
    kernel into a scratch buffer: rare, and one code path."""
    if dw is None and db is None:
        return
    if dw is None:
        dw = hw.new_empty(offsets.shape[0] - 1, go.shape[1], hw.shape[1])
    launch_wgrad(go, hw, offsets, dw, tile, k=k, db=db, gather_a=(src, route_w))
