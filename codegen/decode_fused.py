"""When an inference forward takes decode_experts_kernel.py's GEMV path, and with which blocks.

The GEMV kernel reads each routed copy's expert weights once per copy: right while a batch's copies
land on distinct experts (one token: k distinct experts by construction), wasteful once they share
them, where the grouped GEMMs read each expert once for all its rows. So by default it takes forwards
of at most DEFAULT_MAX_TOKENS tokens. MOEC_DECODE_FUSED=0 turns it off, =1 takes it up to
FUSED_MAX_TOKENS (for measuring where the crossover lies), unset is the default.
"""
import os

import torch

from .errors import MoecError

DEFAULT_MAX_TOKENS = 0      # off until it beats the grouped GEMMs: benchmarks/decode_fused_ab.py
FUSED_MAX_TOKENS = 16
_MODES = {"": DEFAULT_MAX_TOKENS, "1": FUSED_MAX_TOKENS, "0": 0}


def _from_env() -> int:
    value = os.environ.get("MOEC_DECODE_FUSED", "")
    if value not in _MODES:
        raise MoecError(f"MOEC_DECODE_FUSED={value!r}: expected 1 (up to {FUSED_MAX_TOKENS} tokens), 0 (off), or "
                        f"unset (up to {DEFAULT_MAX_TOKENS})")
    return _MODES[value]


_state = {"max_tokens": _from_env(), "settings": None}


def set_max_tokens(n) -> None:
    """The largest forward the GEMV path takes (0: off; None: the default)."""
    _state["max_tokens"] = DEFAULT_MAX_TOKENS if n is None else int(n)


def max_tokens() -> int:
    return _state["max_tokens"]


def set_settings(value) -> None:
    """Pin (block_f, block_h, num_warps, num_stages) for every launch (benchmarks sweep them); None: `settings`' own."""
    _state["settings"] = value


def use(x: torch.Tensor, tokens: int, has_lora: bool) -> bool:
    """Whether an inference forward of `tokens` tokens on x takes the GEMV path (no LoRA: its
    low-rank terms live in the grouped kernels)."""
    return 0 < tokens <= _state["max_tokens"] and not has_lora


def settings(x: torch.Tensor, H: int, F: int) -> tuple[int, int, int, int]:
    """(block_f, block_h, num_warps, num_stages). On a GPU: enough programs per copy (F / block_f) to keep the
    SMs streaming at one token; on the CPU interpreter, small blocks (fast to emulate, and many
    programs so that block edges are exercised)."""
    if _state["settings"] is not None:
        return _state["settings"]
    if not x.is_cuda:
        return 16, 16, 1, 1
    return 64, 128, 4, 4
