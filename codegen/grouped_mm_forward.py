"""The forward's down projection through CUTLASS's grouped GEMM (`torch._grouped_mm`).

Why: moec's down launch has no epilogue work in the common case (the routing weight is applied
by the combine, no bias, no LoRA), so it is a plain grouped GEMM, and there CUTLASS's
warp-specialized persistent kernel is faster than Triton 3.6's at large rows per expert
(Mixtral's step, H100, stop 29: moec's down at 547 TFLOP/s against CUTLASS's 668 on the same
rows). Where moec's launch does more (a down bias, LoRA's rank-r term, PDL chaining at decode
token counts, which CUTLASS's kernel cannot join) it keeps the Triton kernel.

Switch: MOEC_GROUPED_MM_FORWARD (bf16 on sm90 only, `grouped_mm_wgrad.usable`). Rows of dropped
copies (past offsets[E]) are zeroed after, as moec's kernel writes them.
"""
import os

import torch

from . import grouped_mm_wgrad
from .zero_tail_kernel import zero_tail

ENABLED = os.environ.get("MOEC_GROUPED_MM_FORWARD", "0") == "1"


def down_taken(h, w_down, b_down, lora_down, pdl) -> bool:
    """Whether y = h @ W_down[e]^T goes to CUTLASS: h (S, F); w_down (E, H, F) any view."""
    if not ENABLED or b_down is not None or lora_down is not None or pdl or not grouped_mm_wgrad.usable(h):
        return False
    b = w_down.transpose(1, 2)                                     # (E, F, H): the GEMM's B
    if any(d % 8 for d in b.shape[1:]) or not (b.stride(2) == 1 or b.stride(1) == 1):
        return False
    return b.stride(0) % 8 == 0 and max(b.stride(1), b.stride(2)) % 8 == 0   # CUTLASS: 16-byte aligned rows


def down_rows(h, w_down, offsets):
    """(S, H) = h's rows @ W_down[e]^T per expert; rows of dropped copies zero."""
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offsets[1:].to(torch.int32))
    return zero_tail(y, offsets)
