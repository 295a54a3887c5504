"""`moec.explain(model, *args)`: which MoE regions moec fused, which it missed, and why."""
from dataclasses import dataclass, field

import torch

from . import session
from .capture import TOLIST_BREAK, switches

_BREAK_FIX = ("a graph break splits this layer: Dynamo cannot capture a loop over the experts that "
              "received tokens (a data-dependent list), so no single graph holds the layer and it runs "
              "unfused. Fix: loop over `range(E)` with masks or `torch.where` (moec captures that whole), "
              "or, where the model offers it, `model.set_experts_implementation(\"grouped_mm\")`")
_HOST_SIZES_FIX = ("a graph break splits this layer: it reads per-expert sizes on the host (`.tolist()` of a "
                   "data-dependent length, e.g. `bincount(...).tolist()` then `torch.split` by the counts), so no "
                   "single graph holds the layer and it runs unfused. Fix: keep the counts on the device "
                   "(`torch._grouped_mm` with offsets `cumsum(bincount(...))`, as Hugging Face's grouped_mm experts "
                   "do), or loop over `range(E)` with masks or `torch.where` (moec captures either whole)")


@dataclass(frozen=True)
class RegionInfo:
    module: str
    num_experts: int
    top_k: int
    router: str
    idiom: str
    status: str          # "fused" | "missed"
    reason: str = ""     # why missed; "" when fused
    where: str = ""      # file:line of the user code the reason points at


@dataclass
class Explanation:
    regions: list = field(default_factory=list)
    graph_count: int = 0
    graph_breaks: list = field(default_factory=list)   # (reason, file:line)

    @property
    def fused(self):
        return [r for r in self.regions if r.status == "fused"]

    @property
    def missed(self):
        return [r for r in self.regions if r.status == "missed"]

    def __str__(self):
        head = ("module", "experts", "top_k", "router", "idiom", "status", "reason")
        rows = [(r.module or "<root>", str(r.num_experts), str(r.top_k), r.router, r.idiom, r.status,
                 (r.reason + (f" [{r.where}]" if r.where else ""))) for r in self.regions]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        widths[-1] = len(head[-1])
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [f"moec: {len(self.fused)} fused, {len(self.missed)} missed, in {self.graph_count} graph(s)",
               line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        for reason, where in self.graph_breaks:
            out.append(f"graph break at {where or '?'}: {reason}")
        return "\n".join(out)


def explain(model_or_fn, *args, **kwargs) -> Explanation:
    """Compile `model_or_fn` with moec (dense parts left eager, for speed), run it once on the
    given inputs, and report every MoE region found. Model state is not changed."""
    from .backend import moec_backend
    session.clear()
    compiled = torch.compile(model_or_fn, backend=moec_backend, options={"dense_backend": "eager"})
    compiled(*args, **kwargs)
    records = session.take()
    result = Explanation(graph_count=len(records))
    for rec in records:
        detect = rec.reports.get("detect")
        if detect is None:
            continue
        rewritten = set(getattr(rec.reports.get("rewrite"), "rewritten", ()))
        for r in detect.regions:
            fused = r.module in rewritten
            result.regions.append(RegionInfo(
                r.module, r.num_experts, r.top_k, r.router.kind, r.idiom,
                "fused" if fused else "missed", "" if fused else "not rewritten (stop_after/disable/max_rewrites)"))
        for m in detect.misses:
            if m.kind == "graph_break" and len(records) == 1:
                continue   # top-k results that leave an unbroken graph are its output (sampling), not a layer
            result.regions.append(RegionInfo(m.module, m.num_experts, m.top_k, "", m.idiom or "?",
                                             "missed", m.reason, m.where))
    if result.graph_count > 1:
        result.graph_breaks = _graph_breaks(model_or_fn, args, kwargs)
        if result.missed and result.graph_breaks:
            host_sizes = any(reason.startswith(TOLIST_BREAK) for reason, _ in result.graph_breaks)
            fix = _HOST_SIZES_FIX if host_sizes else _BREAK_FIX
            result.regions = [_with_break_fix(r, fix) for r in result.regions]
    return result


def _graph_breaks(model_or_fn, args, kwargs):
    with switches():
        out = torch._dynamo.explain(model_or_fn)(*args, **kwargs)
    breaks = []
    for b in out.break_reasons:
        frames = [f for f in b.user_stack if "torch/" not in f.filename.replace("\\", "/")]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        first = str(b.reason).strip().splitlines()[0] if str(b.reason).strip() else "?"
        if (first, where) not in breaks:
            breaks.append((first, where))
    return breaks


def _with_break_fix(r, fix):
    if r.status != "missed" or "graph break" not in r.reason:
        return r
    return RegionInfo(r.module, r.num_experts, r.top_k, r.router, r.idiom, r.status, fix, r.where)
