"""dW_down through CUTLASS's grouped GEMM (`torch._grouped_mm`, K-grouped: the expert's rows are the
reduction), where its result can be the down base's whole gradient.

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

Off by default until it has run end to end on a card: the operands' A/B ran there (bitwise equal
values, every expert with rows), the op with experts without rows and dropped copies only on the
CPU's fallback of `_grouped_mm` (tests/codegen/test_grouped_mm_wgrad.py). MOEC_GROUPED_MM_WGRAD=1
turns it on.

The dual gate/up gradient stays on moec's kernel: as one GEMM it needs du and dg side by side in
one (S, 2F) buffer in the fused base's order (the dh kernel writes them apart), and on GPT-OSS's
interleaved base never.
"""
import os

import torch

from . import layout as layouts

ENABLED = os.environ.get("MOEC_GROUPED_MM_WGRAD", "0") == "1"
# tests: take the path on any device torch._grouped_mm runs on (the CPU's fallback), not only sm90
ANY_DEVICE = False


def whole_base(hw, weights, layout, needs):
    """(index of the base w_down reads, whether it is read transposed) where dW_down can be made
    as that base's whole gradient by torch._grouped_mm, else None."""
    from .wgrad_kernel import copy_mib
    if not ENABLED or hw.dtype != torch.bfloat16 or copy_mib() is not None or not hasattr(torch, "_grouped_mm"):
        return None
    if not ANY_DEVICE and not (hw.is_cuda and torch.cuda.get_device_capability(hw.device) == (9, 0)):
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
    offs = offsets[1:].to(torch.int32)
    if transposed:
        return torch._grouped_mm(hw.t(), go_rows, offs=offs)
    return torch._grouped_mm(go_rows.t(), hw, offs=offs)
