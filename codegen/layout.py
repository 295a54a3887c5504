"""How `moec.experts` reads its expert weights out of the user's parameters: the `layout` string.

The op receives each distinct base tensor once (`weights`, in order of first use) and builds the
per-role views itself, below autograd, so the backward returns one gradient per base written in
place, instead of autograd's slice_backward (zero-fill the whole fused weight, copy, add) per view.

Roles, each read as (E, N, K) with y = x @ w[e].T (biases as (E, N)):
    w_up, w_gate (E, F, H)   w_down (E, H, F)   b_up, b_gate (E, F)   b_down (E, H)
A layout names, for each present role, `role=<index into weights>[T][[start:stop:step]]`:
T transposes the last two dims first, the slice is along dim 1 after that (stop may be empty).
    "w_up=0[1024:2048:1] w_gate=0[0:1024:1] w_down=1"          HF fused gate_up (E, 2F, H)
    "w_up=0T[1::2] w_gate=0T[0::2] w_down=1T b_up=2[1::2] ..."   GPT-OSS (E, H, 2F), interleaved

LoRA (optional, per projection p in up, gate, down): the projection's weight is W_p + s_p B_p A_p,
read as the factors, never merged: y_p = x W_p^T + s_p (x A_p^T) B_p^T.
    lora_a_p (E, r, K)   lora_b_p (E, N, r)   lora_scale_p=<float>   (K, N: the projection's in, out)
The factors are views of bases like the weights (PEFT's shared A for a fused gate_up is one view
read by both lora_a_up and lora_a_gate; B's halves are slices):
    "w_up=0[16:32:1] w_gate=0[0:16:1] w_down=1 lora_a_up=2 lora_b_up=3[16:32:1] lora_scale_up=2.0 ..."
This module is the one place that formats, parses and applies layouts.
"""
import functools
import re
from dataclasses import dataclass
from typing import Optional

ROLES = ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")
PROJECTIONS = ("up", "gate", "down")
LORA_ROLES = tuple(f"lora_{f}_{p}" for p in PROJECTIONS for f in ("a", "b"))
ALL_ROLES = ROLES + LORA_ROLES
_TOKEN = re.compile(r"(\w+)=(\d+)(T?)(?:\[(-?\d*):(-?\d*):(\d*)\])?$")
_SCALE = re.compile(r"lora_scale_(up|gate|down)=(\S+)$")


@dataclass(frozen=True)
class View:
    """One role's view of a base: weights[index], transposed(-2, -1) if `transpose`, then
    [:, start:stop:step] if `slice` (start, step, stop) is given (the order passes/region.py uses)."""
    index: int
    transpose: bool = False
    slice: Optional[tuple] = None


def pack(specs, lora=(None, None, None)):
    """specs: one (base, transpose, (start, step, stop) | None) or None per role of ROLES; lora:
    per projection of PROJECTIONS, None or (A spec, B spec, scale) ->
    (distinct bases in order of first use, layout string). Bases are compared by identity, so
    this serves fx nodes (the rewrite) and tensors (identify, tests, benchmarks) alike."""
    bases, views, scales = [], {}, {}
    factors = [f if f is not None else (None, None, None) for f in lora]
    lora_specs = [spec for a, b, _ in factors for spec in (a, b)]
    for role, spec in zip(ALL_ROLES, list(specs) + lora_specs):
        if spec is None:
            continue
        base, transpose, sl = spec
        index = next((i for i, b in enumerate(bases) if b is base), None)
        if index is None:
            index = len(bases)
            bases.append(base)
        views[role] = View(index, bool(transpose), None if sl is None else tuple(sl))
    for p, (_, _, scale) in zip(PROJECTIONS, factors):
        if scale is not None:
            scales[p] = float(scale)
    return bases, format_layout(views, scales)


def format_layout(views: dict, scales: dict = None) -> str:
    out = []
    for role in ALL_ROLES:
        v = views.get(role)
        if v is None:
            continue
        text = f"{role}={v.index}{'T' if v.transpose else ''}"
        if v.slice is not None:
            start, step, stop = v.slice
            text += f"[{start}:{'' if stop is None else stop}:{step}]"
        out.append(text)
    out += [f"lora_scale_{p}={scales[p]!r}" for p in PROJECTIONS if p in (scales or {})]
    return " ".join(out)


@functools.lru_cache(maxsize=None)
def parse(layout: str) -> dict:
    """layout string -> {role: View} (LoRA factors included); raises ValueError naming the bad part."""
    views = {}
    for token in layout.split():
        if _SCALE.match(token):
            continue
        m = _TOKEN.match(token)
        if m is None or m.group(1) not in ALL_ROLES or m.group(1) in views:
            raise ValueError(f"bad or repeated entry {token!r}; expected role=index[T][[start:stop:step]] "
                             f"with role one of {ALL_ROLES}, or lora_scale_<projection>=<float>")
        role, index, t, start, stop, step = m.groups()
        sl = None
        if m.group(4) is not None:
            sl = (int(start or 0), int(step or 1), int(stop) if stop else None)
        views[role] = View(int(index), t == "T", sl)
    scales = lora_scales(layout)
    for p in PROJECTIONS:
        present = (f"lora_a_{p}" in views, f"lora_b_{p}" in views, p in scales)
        if any(present) and not all(present):
            raise ValueError(f"LoRA on {p} needs lora_a_{p}, lora_b_{p} and lora_scale_{p} together")
    return views


@functools.lru_cache(maxsize=None)
def lora_scales(layout: str) -> dict:
    """{projection: scale} of the projections the layout gives LoRA factors."""
    scales = {}
    for token in layout.split():
        m = _SCALE.match(token)
        if m is None:
            continue
        if m.group(1) in scales:
            raise ValueError(f"repeated entry {token!r}")
        try:
            scales[m.group(1)] = float(m.group(2))
        except ValueError:
            raise ValueError(f"bad scale in {token!r}; expected lora_scale_<projection>=<float>") from None
    return scales


def view(base, v: Optional[View]):
    """The role tensor a View reads; also applied to a gradient buffer to get the role's slot."""
    if v is None:
        return None
    t = base.transpose(-2, -1) if v.transpose else base
    if v.slice is not None:
        start, step, stop = v.slice
        t = t[:, start:stop:step]
    return t


def views(weights, layout: str) -> list:
    """[w_up, w_gate, w_down, b_up, b_gate, b_down] as views of `weights` (None where absent)."""
    parsed = parse(layout)
    return [view(weights[parsed[r].index], parsed[r]) if r in parsed else None for r in ROLES]


def has_lora(layout: str) -> bool:
    """Whether any projection reads LoRA factors."""
    return any(role in LORA_ROLES for role in parse(layout))


def preactivation_width(weights, layout: str, roles=None) -> int:
    """Columns of the saved pre-activations u | g: 2F, or F without a gate. roles: `views`' answer,
    where the caller has it."""
    w_up, w_gate = (roles or views(weights, layout))[:2]
    return w_up.shape[1] * (1 if w_gate is None else 2)


def lora(weights, layout: str) -> list:
    """Per projection of PROJECTIONS: (A (E, r, K), B (E, N, r), scale) as views of `weights`, or None."""
    parsed, scales = parse(layout), lora_scales(layout)
    return [(view(weights[parsed[f"lora_a_{p}"].index], parsed[f"lora_a_{p}"]),
             view(weights[parsed[f"lora_b_{p}"].index], parsed[f"lora_b_{p}"]), scales[p])
            if p in scales else None for p in PROJECTIONS]


def users(layout: str, n_weights: int) -> list:
    """For each base, the roles that read it (in ALL_ROLES order)."""
    parsed = parse(layout)
    return [[r for r in ALL_ROLES if r in parsed and parsed[r].index == i] for i in range(n_weights)]


@functools.lru_cache(maxsize=None)
def grad_plan(layout: str, dims: tuple, skip: tuple = ()) -> tuple:
    """How the backward writes one gradient per base in place. dims: each base's dim-1 and
    dim-2 sizes (0 for a missing dim 2); skip: roles whose gradient another role's write already
    holds (a shared LoRA A). -> (bases to zero first, roles to accumulate).

    A role writes straight into its view of its base's buffer when no earlier role of that base
    covered the same elements; an overlapping role's gradient is added after (needs a temporary).
    A base its roles do not cover entirely, or with such an overlap, is zero-filled first.
    HF and GPT-OSS layouts (disjoint halves or interleaved rows) need neither.
    Cached per (layout, sizes): the op body runs it on every call.
    """
    parsed = parse(layout)
    zero, accumulate = [], []
    for i, (n1, n2) in enumerate(dims):
        covered, orient = set(), None
        for role in (r for r in ALL_ROLES if r in parsed and parsed[r].index == i and r not in skip):
            v = parsed[role]
            n = n2 if v.transpose else n1
            rows = set(range(n)[slice(v.slice[0], v.slice[2], v.slice[1])] if v.slice else range(n))
            if (orient is not None and orient != v.transpose) or covered & rows:
                accumulate.append(role)     # a second, differently oriented or overlapping reader
            orient = v.transpose if orient is None else orient
            covered |= rows
        # an accumulating role may also reach elements no direct writer covered: zero those too
        if len(covered) < (n2 if orient else n1) or any(parsed[r].index == i for r in accumulate):
            zero.append(i)
    return tuple(zero), tuple(accumulate)


DOWN_ROLES = ("w_down", "b_down", "lora_a_down", "lora_b_down")


def _sides(layout):
    """(indices of the bases the down projection's roles read, indices of those the other roles read)."""
    parsed = parse(layout)
    return ({v.index for r, v in parsed.items() if r in DOWN_ROLES},
            {v.index for r, v in parsed.items() if r not in DOWN_ROLES})


def phases(weights, layout, needs):
    """(needs of the bases only the down projection's roles read, needs of the others): a base
    that both sides read (not a layout moec's rewrite makes) goes wholly in the second, made first."""
    needs = [True] * len(weights) if needs is None else list(needs)
    down, others = _sides(layout)
    down -= others
    return [n and i in down for i, n in enumerate(needs)], [n and i not in down for i, n in enumerate(needs)]


def split_phases(weights, layout, needs):
    """`phases` where the experts' backward can be split into ops (no LoRA, no base read by both sides,
    some down base trains), else None."""
    if any(f is not None for f in lora(weights, layout)):
        return None
    down, others = _sides(layout)
    if down & others:
        return None
    down_only, first = phases(weights, layout, needs)
    return (down_only, first) if any(down_only) else None
