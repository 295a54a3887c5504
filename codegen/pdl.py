"""Programmatic dependent launch (PDL, sm90+) for the inference forward's chain of launches:
route_plan -> gate/up -> down -> combine.

Why: at one token a layer's kernels each stream a few MB of weights in ~5-20 us, and between two
of them the GPU drains the first's last CTAs before it starts the next's (Qwen3, one token, H100:
58 us against a 25 us bandwidth floor, bench_layer_decode_compiled_h100.md). With PDL a kernel
is launched while the one before it still runs: its CTAs become resident and wait (gdc_wait, the
first thing each of them does, so nothing is read before the producer is done). The small kernels
(route_plan, combine) let their dependents in as soon as all their CTAs have started; the GEMMs only
once every CTA is past its K loop, so that waiting CTAs never take the slots of a later wave.
H100, 2026-12-05 (benchmarks/results/stop23_h100/decode_pdl*): with the release at the top
everywhere, one token went 57 -> 54 us (Qwen3) and 66 -> 62 (OLMoE), but Mixtral, whose gate/up
grid runs in several waves, went 269 -> 303 us at one token and 989 -> 1092 at 64: hence the
release after the K loop. Measured again with it (stop23_h100/decode_pdl_release_*): one token
58 -> 54 us (Qwen3), Mixtral even (269 -> 267); at 64 tokens Qwen3 even, Mixtral 1078 -> 1117 us;
at 8 tokens the first placement was 1-2% slower on all three. So by default PDL goes only with a
one-token forward (batch-1 decode, AUTO_MAX_TOKENS); MOEC_PDL=1 takes it to every decode-sized
forward (PDL_MAX_TOKENS), MOEC_PDL=0 nowhere.
"""
import functools
import os

import torch

from .errors import MoecError

AUTO_MAX_TOKENS = 1
PDL_MAX_TOKENS = 64
_MODES = {"": AUTO_MAX_TOKENS, "1": PDL_MAX_TOKENS, "0": 0}


def _from_env() -> int:
    value = os.environ.get("MOEC_PDL", "")
    if value not in _MODES:
        raise MoecError(f"MOEC_PDL={value!r}: expected 1 (on up to {PDL_MAX_TOKENS} tokens), 0 (off), or unset "
                        f"(on for {AUTO_MAX_TOKENS}-token forwards)")
    return _MODES[value]


_state = {"max_tokens": _from_env()}


def set_enabled(on) -> None:
    """True: up to PDL_MAX_TOKENS; False: off; None: the default (AUTO_MAX_TOKENS)."""
    _state["max_tokens"] = AUTO_MAX_TOKENS if on is None else PDL_MAX_TOKENS if on else 0


def max_tokens() -> int:
    """The largest forward PDL goes with (0: off)."""
    return _state["max_tokens"]


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def use(t: torch.Tensor, tokens: int) -> bool:
    """Whether launches reading t, a forward of `tokens` tokens, go with PDL."""
    return tokens <= _state["max_tokens"] and t.is_cuda and _hopper_or_newer(t.device)


def launch_kwargs(on: bool) -> dict:
    """The kernel's PDL constexpr and Triton's launch option, or nothing (the kernels' defaults)."""
    return {"PDL": True, "launch_pdl": True} if on else {}
