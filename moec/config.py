"""moec's configuration: one dataclass, set by `torch.compile(..., options={...})` or MOEC_* variables.

Options win over environment variables, which win over the defaults. Nothing else in moec reads
the environment.
"""
import dataclasses
import os
from dataclasses import dataclass, field

from .errors import MoecError


@dataclass(frozen=True)
class Config:
    dense_backend: str = "inductor"
    """Backend that compiles everything outside the MoE regions: any name `torch.compile` accepts
    ("inductor", "eager", "aot_eager", ...). MOEC_DENSE_BACKEND."""

    stop_after: str = ""
    """Stop the pass pipeline after the named pass, e.g. "detect" to find regions without
    rewriting them (the first rung of the debug ladder). MOEC_STOP_AFTER."""

    disable: tuple = field(default_factory=tuple)
    """Names of passes to skip, e.g. ("rewrite",). MOEC_DISABLE="rewrite,..."."""

    max_rewrites: int = -1
    """Rewrite only the first N regions (-1: all). Bisects a wrong result to one region.
    MOEC_MAX_REWRITES."""

    capture_dynamic: bool = True
    """Trace with Dynamo's capture_dynamic_output_shape_ops and capture_scalar_outputs on, so
    expert loops over `range(E)` with masks or `torch.where` are captured whole instead of
    graph-breaking. Only code compiled with backend="moec" is traced this way. MOEC_CAPTURE_DYNAMIC."""

    hf_eager_experts_as: str = "grouped_mm"
    """Hugging Face's "eager" experts loop iterates over the experts that received tokens, which
    Dynamo cannot capture; trace transformers' own implementation of that name instead (same
    contract and weights; explain reports the swap). "" keeps the loop, which graph-breaks and
    is reported as a miss. Like capture_dynamic it acts while Dynamo traces, before options are
    read: set it with MOEC_HF_EAGER_EXPERTS_AS."""

    dump_dir: str = ""
    """Write pass debugging dumps here: one folder per compiled graph with the input graph, the
    graph after every pass, the regions and misses, region pictures, the AOT forward/backward
    graphs and the kernels chosen (see moec/dump.py). MOEC_DUMP or MOEC_DUMP_DIR."""

    cache_dir: str = ""
    """Where moec keeps what it measures once per machine, e.g. the overlap cost model's
    calibration (calibration/<device>-ws<W>-<backend>.json, see moec/runtime/cost_model.py);
    "" is ~/.cache/moec. MOEC_CACHE_DIR."""

    ep_group: object = None
    """Expert parallelism: the group the experts are spread over — a DeviceMesh with a dimension
    named "ep", a 1-D DeviceMesh, a ProcessGroup, or "world"; None (default) keeps every expert on
    every rank. Rank r of a group of size ep runs experts [r*E/ep, (r+1)*E/ep); shard their
    weights with `moec.runtime.shard_experts(model, ep_group)`. MOEC_EP_GROUP=world."""

    ep_capacity_factor: float = 0.0
    """With ep_group: 0 (default) is dropless (per-step split sizes: one device->host sync per MoE
    layer). f > 0 sends at most ceil(f*T*k/E) copies from each rank to each expert, the first in
    token order, in fixed-size all-to-alls without a sync; copies past that get zero output.
    Needs the same T on every rank. MOEC_EP_CAPACITY_FACTOR."""

    ep_chunks: int = 0
    """With ep_group: run each MoE layer as a pipeline of this many token chunks, so one chunk's
    all-to-alls travel while another computes (pass chunk_tokens; the ops around the layer that
    treat each token alone, e.g. norms, residuals, router and projections, are chunked with it).
    0 (default): the cost model chooses k per layer, calibrated once per machine (see cache_dir);
    1: off; n: n chunks (capacity mode: n pieces of the slots). Off too with disable=("chunk_tokens",).
    MOEC_EP_CHUNKS."""

    ep_chunk_by: str = "auto"
    """With ep_group and chunking: what the chunks are cut in. "auto" (default): tokens, or whole
    sequences where attention ends the tokens' range and sequences let more ops run in the chunks
    (forced k, or no all-to-all model) or save more time by the cost model (then attention and what
    comes before it are chunked too); "tokens"; "sequences" (where the batch has at least k
    sequences, else tokens). MOEC_EP_CHUNK_BY."""

    expert_stats: bool = False
    """Count on the device, per MoE layer, the token copies routed to each expert (and, with
    capacity routing, those dropped): a few tiny device ops per layer and step, no host reads.
    Read them with `moec.stats(model)`; see moec/expert_load.py. MOEC_EXPERT_STATS."""

    expert_stats_log_every: int = 100
    """With expert_stats and TORCH_LOGS=moec: log each layer's counts every N forward calls
    (each log line reads that layer's counts to the host; 0: never). MOEC_EXPERT_STATS_LOG_EVERY."""

    wgrad_schedule: bool = True
    """With ep_group: in the backward, run weight gradients while the all-to-alls are in flight
    (passes/schedule_wgrad.py; Inductor and aot_eager), the experts' own split from their input
    gradient first (passes/split_experts_backward.py; disable=("split_experts_backward",) keeps
    them fused). False, or disable=("schedule_wgrad",), keeps AOT autograd's order.
    MOEC_WGRAD_SCHEDULE."""

    wgrad_memory_bound_mb: float = 0.0
    """How far (MiB) moving weight gradients may raise the backward's predicted peak memory;
    0: not at all. MOEC_WGRAD_MEMORY_BOUND_MB."""

    token_buckets: str = "auto"
    """Run a dynamic graph on its token count padded to the next power of two, so that CUDA graphs
    are captured per bucket, not per count (passes/token_buckets.py proves where that is sound,
    else says why not): "auto" with CUDA graphs (mode="reduce-overhead", dense_backend
    "cudagraphs"), "always", "off". MOEC_TOKEN_BUCKETS."""

    @classmethod
    def from_options(cls, options: dict | None = None) -> "Config":
        values = _from_env()
        for key, v in (options or {}).items():
            if key not in _FIELDS:
                raise MoecError(f"unknown moec option {key!r}; known options: {sorted(_FIELDS)}")
            values[key] = v
        values = {k: _coerce(k, v) for k, v in values.items()}
        for name, choices in _CHOICES.items():
            if values.get(name, _FIELDS[name].default) not in choices:
                raise MoecError(f"moec option {name}={values[name]!r}: expected one of {choices}")
        return cls(**values)


_CHOICES = {"ep_chunk_by": ("auto", "tokens", "sequences"), "token_buckets": ("auto", "always", "off")}


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


_ENV_ALIASES = {"dump_dir": "MOEC_DUMP"}   # the short spellings users type


def env_value(name: str):
    """One option as the environment sets it (its default where unset), without building a
    Config: for code that runs on every call of a compiled function."""
    raw = _env_raw(name)
    return _FIELDS[name].default if raw is None else _coerce(name, raw)


def _env_raw(name: str):
    names = _env_names.get(name)
    if names is None:
        names = _env_names[name] = (f"MOEC_{name.upper()}",) + ((_ENV_ALIASES[name],) if name in _ENV_ALIASES else ())
    for env in names:
        raw = os.environ.get(env)
        if raw is not None:
            return raw
    return None


_env_names: dict = {}      # option -> its variables, built once (env_value runs on every compiled call)


def _from_env() -> dict:
    out = {}
    for name in _FIELDS:
        raw = _env_raw(name)
        if raw is not None:
            out[name] = raw
    return out


def _coerce(name, v):
    default = _FIELDS[name].default if _FIELDS[name].default is not dataclasses.MISSING else ()
    if default is None:      # an object option (a process group or mesh): taken as given
        return v
    try:
        if isinstance(default, bool):
            return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(v)
        if isinstance(default, float):
            return float(v)
        if isinstance(default, tuple):
            return tuple(s for s in v.split(",") if s) if isinstance(v, str) else tuple(v)
        return v if callable(v) else str(v)
    except (TypeError, ValueError):
        raise MoecError(f"moec option {name}={v!r}: expected a {type(default).__name__}") from None
