"""When an inference forward takes decode_experts_kernel.py's GEMV path, and with which blocks.

Measured on an H100 (2026-12-07, `benchmarks/results/stop34_h100/`, decode_fused_ab.py: four layers in
one CUDA graph, per layer, against the grouped GEMMs): it wins where an expert is small, so that the
grouped kernels' ramp and tail are a large share of a one-token layer: Qwen3 (9.4 MB an expert)
1.04x at one and two tokens, 1.02x at four; OLMoE (12.6 MB) 1.07x, 1.04x, 1.00x. Where experts are
large the grouped GEMMs already stream at 88-90% of the floor and it does not: DeepSeek-V3 (88 MB)
0.99x, Mixtral (352 MB) 1.00x at one token and 0.96x at two. GPT-OSS's interleaved gate/up rows
(its H axis strided) 0.97x. It also reads each copy's weights once per copy, which stops paying
once a batch's copies share experts. Hence the default: at most DEFAULT_MAX_TOKENS tokens, gate/up
rows contiguous along H, an expert of at most MAX_EXPERT_BYTES. MOEC_DECODE_FUSED=0 turns it off;
=1 takes it up to FUSED_MAX_TOKENS tokens on any layer (for measuring).
"""
import os

import torch

from .errors import MoecError

DEFAULT_MAX_TOKENS = 2
MAX_EXPERT_BYTES = 16 << 20
FUSED_MAX_TOKENS = 16
_MODES = {"": (DEFAULT_MAX_TOKENS, False), "1": (FUSED_MAX_TOKENS, True), "0": (0, False)}


def _from_env() -> tuple[int, bool]:
    """(max tokens, any layer) from MOEC_DECODE_FUSED."""
    value = os.environ.get("MOEC_DECODE_FUSED", "")
    if value not in _MODES:
        raise MoecError(f"MOEC_DECODE_FUSED={value!r}: expected 1 (up to {FUSED_MAX_TOKENS} tokens, any layer), 0 "
                        f"(off), or unset (up to {DEFAULT_MAX_TOKENS}, small experts)")
    return _MODES[value]


_state = dict(zip(("max_tokens", "any_layer"), _from_env()), settings=None)


def set_max_tokens(n, any_layer=None) -> None:
    """The largest forward the GEMV path takes (0: off; None: the default). any_layer: also layers
    the default leaves to the grouped GEMMs (large experts, H-strided gate/up rows); None: True
    exactly when n is given."""
    _state["max_tokens"] = DEFAULT_MAX_TOKENS if n is None else int(n)
    _state["any_layer"] = n is not None if any_layer is None else any_layer


def max_tokens() -> int:
    return _state["max_tokens"]


def set_settings(value) -> None:
    """Pin (block_f, block_h, num_warps, num_stages) or (block_f, rows_f, block_h, ...) for every launch
    (benchmarks sweep them); None: `settings`' own."""
    _state["settings"] = value


def use(x: torch.Tensor, tokens: int, has_lora: bool, roles) -> bool:
    """Whether an inference forward of `tokens` tokens on x takes the GEMV path. roles: the
    layer's views (layout.views)."""
    w_up, w_gate = roles[:2]
    _, F, H = w_up.shape
    gate_up = [w for w in (w_up, w_gate) if w is not None]
    layer = layer_takes(expert_bytes(w_gate is not None, F, H, w_up.element_size()),
                        rows_along_h=all(w.stride(2) == 1 for w in gate_up), has_lora=has_lora)
    return 0 < tokens <= _state["max_tokens"] and layer


def expert_bytes(gated: bool, F: int, H: int, itemsize: int) -> int:
    """One expert's weights: gate (if gated), up and down, F x H each."""
    return (3 if gated else 2) * F * H * itemsize


def layer_takes(expert_bytes: int, rows_along_h: bool, has_lora: bool) -> bool:
    """Whether a layer is one the GEMV path takes at up to max_tokens() tokens. Never with LoRA (its
    low-rank terms live in the grouped kernels)."""
    return not has_lora and (_state["any_layer"] or (expert_bytes <= MAX_EXPERT_BYTES and rows_along_h))


def describe(expert_bytes: int, rows_along_h: bool, has_lora: bool) -> str:
    """For dumps: which path this layer's inference forwards take, by token count, and why."""
    n = _state["max_tokens"]
    if n == 0:
        return "grouped GEMMs at every size (MOEC_DECODE_FUSED=0)"
    if layer_takes(expert_bytes, rows_along_h, has_lora):
        return f"one GEMV kernel + a per-token reduction at <= {n} tokens, grouped GEMMs above"
    why = ("LoRA factors" if has_lora else f"experts of {expert_bytes / 2**20:.1f} MiB > {MAX_EXPERT_BYTES >> 20} MiB"
           if expert_bytes > MAX_EXPERT_BYTES else "gate/up rows strided along the hidden axis")
    return f"grouped GEMMs at every size ({why})"


def settings(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(block_f, rows_f, block_h, num_warps, num_stages) for a layer's GEMV launch on x's device:
    each program streams rows_f <= block_f rows of F (block_f the MMA tile's width). On a
    GPU, 64 rows a program (the best of stop 34's sweep at one and two tokens); on the CPU
    interpreter, small blocks (fast to emulate, and many programs so that block edges are
    exercised). Pinned (set_settings): a 4-tuple reads rows_f = block_f. Rows chosen so every copy's
    programs fill one wave (Qwen3's one token: 48 rows, 128 programs instead of 96) lost or tied on an
    H100 (stop 37: 45.3 against 44.9 us at one token, 72.3 against 71.6 at two), so 64 stays."""
    pinned = _state["settings"]
    if pinned is not None:
        return pinned if len(pinned) == 5 else (pinned[0], pinned[0], *pinned[1:])
    if not x.is_cuda:
        return 16, 16, 16, 1, 1
    return 64, 64, 128, 4, 4
