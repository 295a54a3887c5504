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
release after the K loop. Off by default (MOEC_PDL=1 turns it on) until a GPU run shows it no
slower anywhere; only where the inference forward is decode-sized (PDL_MAX_TOKENS).
"""
import functools
import os

import torch

PDL_MAX_TOKENS = 64
_state = {"on": os.environ.get("MOEC_PDL", "0") == "1"}


def set_enabled(on: bool) -> None:
    _state["on"] = bool(on)


def enabled() -> bool:
    return _state["on"]


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def use(t: torch.Tensor, tokens: int) -> bool:
    """Whether launches reading t, a forward of `tokens` tokens, go with PDL."""
    return _state["on"] and t.is_cuda and tokens <= PDL_MAX_TOKENS and _hopper_or_newer(t.device)


def launch_kwargs(on: bool) -> dict:
    """The kernel's PDL constexpr and Triton's launch option, or nothing (the kernels' defaults)."""
    return {"PDL": True, "launch_pdl": True} if on else {}
