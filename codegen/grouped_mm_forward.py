"""The forward's plain GEMMs through CUTLASS's grouped GEMM (`torch._grouped_mm`).

Why: moec's fused forward launches are Triton kernels, and at large rows per expert CUTLASS's
warp-specialized persistent kernel runs the same GEMMs faster than Triton 3.6 (Mixtral's step,
H100, stop 29: moec's gate/up at 581 TFLOP/s, its down at 547, CUTLASS's grouped GEMM at 668).
  down:    no epilogue work in the common case (the combine applies the routing weight), so a
           plain grouped GEMM; kept on moec's kernel where it does more (a down bias, LoRA's
           rank-r term) or chains by PDL at decode token counts (CUTLASS's kernel cannot join).
  gate/up: where gate and up read one fused base side by side (`grouped_mm_wgrad.side_by_side`),
           x's rows gathered by token (gather_kernel.py), one grouped GEMM into the pre-activations
           (S, 2F) in the base's column order, then the activation as one pass (act_kernel.py);
           the pre-activations are what training saves anyway. Not at decode (PDL), where moec's
           fused launch reads x once and writes no (S, 2F) buffer.
The saved pre-activations' columns follow who wrote them: `pre_columns` says where u and g start,
for the backward's dh kernel.

Measured (H100, stop 32, benchmarks/results/stop32_h100/): at 4096 tokens CUTLASS's down GEMM is 4-8% faster
than moec's launch, 25-35% slower at 8 tokens; the gate/up's GEMM is faster too, but the gather and the
activation pass's (S, 2F) read make the path slower than moec's fused launch on Qwen3 and OLMoE and even on
Mixtral; compiled training steps 0.98x (Qwen3, OLMoE) and 1.01x (Mixtral). Hence off by default.

Switches: MOEC_GROUPED_MM_FORWARD=1 turns both on (bf16 on sm90 only, `grouped_mm_wgrad.usable`);
DOWN and GATE_UP set each. Rows of dropped copies (past offsets[E]) are zeroed, as moec's kernels
write them.
"""
from . import grouped_mm_wgrad
from .env import switch
from .gather_kernel import gather_rows

DOWN = GATE_UP = switch("MOEC_GROUPED_MM_FORWARD", False)


def _aligned(b) -> bool:
    """b (E, K, N) readable by CUTLASS: one of its last two dims contiguous, 16-byte aligned rows."""
    if any(d % 8 for d in b.shape[1:]) or not (b.stride(2) == 1 or b.stride(1) == 1):
        return False
    return b.stride(0) % 8 == 0 and max(b.stride(1), b.stride(2)) % 8 == 0


def down_taken(h, w_down, b_down, lora_down, pdl) -> bool:
    """Whether y = h @ W_down[e]^T goes to CUTLASS: h (S, F); w_down (E, H, F) any view."""
    if not DOWN or b_down is not None or lora_down is not None or pdl or not grouped_mm_wgrad.usable(h):
        return False
    return _aligned(w_down.transpose(1, 2))


def down_rows(h, w_down, offsets):
    """(S, H) = h's rows @ W_down[e]^T per expert; rows of dropped copies zero."""
    return grouped_mm_wgrad.grouped_rows(h, w_down.transpose(1, 2), offsets)


def gate_up_joint(x, weights, layout):
    """`grouped_mm_wgrad.side_by_side`'s (index, transposed, gate start, up start) where the gate/up
    GEMM goes to CUTLASS, else None. Decided from x, the weights and the switch alone, so that the
    forward and the backward that reads its pre-activations agree."""
    if not GATE_UP or not grouped_mm_wgrad.usable(x):
        return None
    return grouped_mm_wgrad.side_by_side(weights, layout)


def pre_columns(x, weights, layout, F):
    """(u's first column, g's first column) in the saved pre-activations: moec's kernel writes u | g,
    CUTLASS's GEMM the base's order."""
    joint = gate_up_joint(x, weights, layout)
    return (0, F) if joint is None else (joint[3], joint[2])


def gate_up_rows(x, src, k, offsets, base, transposed):
    """pre (S, 2F) = x[src // k] @ W_gate_up[e]^T per expert, in the base's column order; rows of
    dropped copies zero (the activation pass and the saved pre read them)."""
    w = base.transpose(1, 2) if transposed else base                  # (E, 2F, H)
    return grouped_mm_wgrad.grouped_rows(gather_rows(x, src, k), w.transpose(1, 2), offsets)
