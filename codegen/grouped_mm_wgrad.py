"""The backward's plain GEMMs through CUTLASS's grouped GEMM (`torch._grouped_mm`): dW_down (K-grouped: the
expert's rows are the reduction) where its result can be the down base's whole gradient, and, below, the
input gradient's and the gate/up gradient's where gate and up share a base.

Why: on dW_down (K = an expert's ~500-1000 rows: a short main loop per output tile, whose
prologue and epilogue Triton 3.6 does not overlap with the next tile's) moec's Triton kernel ran
at 253-417 TFLOP/s and CUTLASS's warp-specialized persistent kernel at 290-657 on the same operands,
8-37% less time on every layer and token count measured (H100, 2026-12-06,
results/stop29_h100/wgrad_gmm/).
Values are the same (fp32 accumulation, bf16 result). `torch._grouped_mm` has no out= argument,
so it is used only where its output is the gradient itself: w_down reads a whole contiguous base
that no other role reads, in either orientation (HF's (E, H, F) or GPT-OSS's (E, F, H)); a copy
into a slice of a fused base would cost what it saves. bf16 on sm90 (CUTLASS's kernel; on sm100
PyTorch issue 172439 reports garbage for groups with no rows, where sm90 writes zeros), one gathered
copy (no MOEC_WGRAD_COPY_MIB chunks).

On by default (sm90, bf16) since it ran end to end on a card: an H200's compiled training steps took 13-17%
less time on Qwen3 and OLMoE, 10% on Mixtral, 1-2% on GPT-OSS (dW_down alone), same peaks, gradients within
3e-4 (benchmarks/switch_ab.py, results/stop30_h200/); the tests pass there on CUTLASS's kernels.
MOEC_GROUPED_MM_WGRAD=0 turns it off.

Gate and up read side by side from one fused base (HF's gate_up_proj (E, 2F, H), either order, or
its transpose; never GPT-OSS's interleaved one): `joint_gate_up` says where. There the backward's
first op writes du and dg into one (S, 2F) buffer in the base's column order (the dh kernel takes
their row stride), and two more GEMMs go to CUTLASS: the input gradient's rows, dgu @ W_gate_up per
expert (N-grouped; dropped copies' rows zeroed after, as moec's kernel writes them), and the
gate/up base's whole gradient, dgu^T @ x rows per expert (K-grouped). Same switch.
"""
import torch

from . import layout as layouts
from .env import switch
from .zero_tail_kernel import zero_tail

ENABLED = switch("MOEC_GROUPED_MM_WGRAD", True)
# tests: take the path on any device torch._grouped_mm runs on (the CPU's fallback), not only sm90
ANY_DEVICE = False


def cache_key() -> str:
    """What of this module's state decides op output shapes (joint_gate_up's dgu): compiled graphs
    made under one setting are not to be replayed under another (moec/cache_tag.py)."""
    from .wgrad_kernel import copy_mib
    return f"grouped_mm={ENABLED},{ANY_DEVICE},{copy_mib()}"


def usable(t) -> bool:
    """Whether CUTLASS's grouped GEMM is the one `torch._grouped_mm` runs for t (bf16 on sm90),
    or the tests asked for torch's fallback anywhere (ANY_DEVICE)."""
    if t.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return ANY_DEVICE or (t.is_cuda and torch.cuda.get_device_capability(t.device) == (9, 0))


def _on(t) -> bool:
    from .wgrad_kernel import copy_mib
    return ENABLED and copy_mib() is None and usable(t)


def whole_base(hw, weights, layout, needs):
    """(index of the base w_down reads, whether it is read transposed) where dW_down can be made
    as that base's whole gradient by torch._grouped_mm, else None."""
    if not _on(hw):
        return None
    parsed = layouts.parse(layout)
    v = parsed.get("w_down")
    if v is None or not needs[v.index] or any(r != "w_down" and p.index == v.index for r, p in parsed.items()):
        return None
    base = weights[v.index]
    whole = tuple(base.shape[1:][::-1] if v.transpose else base.shape[1:])
    if tuple(layouts.view(base, v).shape[1:]) != whole or not base.is_contiguous() or \
            any(d % 8 for d in base.shape[1:]):      # CUTLASS: 16-byte aligned rows
        return None
    return v.index, v.transpose


def down_wgrad(go_rows, hw, offsets, transposed):
    """The down base's gradient: per expert grad_out's gathered rows^T (w h) (E, H, F), or its
    transpose (E, F, H) for a base read transposed. Rows past offsets[E] (dropped copies) are in
    no group."""
    return _per_expert_at_b(go_rows, hw, offsets, transposed)


def joint_gate_up(x, weights, layout):
    """(index of the base w_gate and w_up read, transposed, gate's first column, up's first column
    in the (E, 2F, H) view of it) where both read one whole contiguous base side by side and
    nothing else reads it (no LoRA; no gate/up biases, whose gradients the rows would owe), else None."""
    return side_by_side(weights, layout) if _on(x) else None


def side_by_side(weights, layout):
    """`joint_gate_up`'s answer from the weights alone, whatever the switches say."""
    if layouts.has_lora(layout):
        return None
    parsed = layouts.parse(layout)
    u, g = parsed.get("w_up"), parsed.get("w_gate")
    if u is None or g is None or u.index != g.index or u.transpose != g.transpose or "b_up" in parsed or \
            "b_gate" in parsed or any(r not in ("w_up", "w_gate") and p.index == u.index for r, p in parsed.items()):
        return None
    base = weights[u.index]
    whole = base.transpose(1, 2) if u.transpose else base          # (E, 2F, H)
    wu, wg = layouts.view(base, u), layouts.view(base, g)
    F = whole.shape[1] // 2
    if not base.is_contiguous() or any(d % 8 for d in base.shape[1:]) or whole.shape[1] != 2 * F or \
            wu.shape != wg.shape or tuple(wu.shape[1:]) != (F, whole.shape[2]) or wu.stride() != whole.stride() \
            or wg.stride() != whole.stride():
        return None
    starts = [(v.storage_offset() - whole.storage_offset()) // whole.stride(1) for v in (wg, wu)]
    if sorted(starts) != [0, F]:
        return None
    return u.index, u.transpose, starts[0], starts[1]


def gate_up_wgrad(dgu, x_rows, offsets, transposed):
    """The gate/up base's gradient: per expert dgu's rows^T x's gathered rows (E, 2F, H), or its
    transpose for a base read transposed."""
    return _per_expert_at_b(dgu, x_rows, offsets, transposed)


def _per_expert_at_b(a, b, offsets, transposed):
    """K-grouped: per expert e, a's rows^T b's rows over offsets[e]:offsets[e+1] (E, M, N), or
    b^T a (E, N, M) where the base it is the gradient of is read transposed."""
    if transposed:
        return torch._grouped_mm(b.t(), a, offs=_group_ends(offsets))
    return torch._grouped_mm(a.t(), b, offs=_group_ends(offsets))


def _group_ends(offsets):
    """torch._grouped_mm's offs: each expert's end row, int32."""
    return offsets[1:].to(torch.int32)


def grouped_rows(a, b, offsets):
    """N-grouped: (S, N) = a's rows @ b[e] (K, N) per expert over offsets[e]:offsets[e+1]; rows of
    dropped copies (past offsets[E], in no group, which the GEMM leaves unwritten) zero, as moec's
    kernels write them."""
    return zero_tail(torch._grouped_mm(a, b, offs=_group_ends(offsets)), offsets)


def input_rows(dgu, base, offsets, transposed):
    """(S, H) = dgu's rows @ W_gate_up[e] (2F, H) per expert, rows of dropped copies zero."""
    return grouped_rows(dgu, base.transpose(1, 2) if transposed else base, offsets)
