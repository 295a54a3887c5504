"""Expert-load telemetry, the user's side: `moec.stats`, `moec.reset_stats`, `moec.dump_stats`.

    compiled = torch.compile(model, backend="moec", options={"expert_stats": True})
    ... train ...
    for layer, load in moec.stats(model).items():
        print(layer, load.counts.tolist(), float(load.imbalance))    # reading is the sync

With `expert_stats` on, every fused MoE layer counts, on its device, the token copies (T*k per
forward call) routed to each expert, and those dropped by capacity routing, summed over forward
calls since it was compiled or reset (the pass `expert_stats`, the buffers in
moec/runtime/expert_load.py). Nothing here reads the device except `to_dict` and `dump_stats`.

`stats(model)` keeps the layers whose expert weights are parameters (or buffers) of `model`,
named by their path in it, so several compiled models in one process stay apart; a compiled
block that Dynamo runs for every layer (per-block compile) counts each layer apart too. Without
a model, layers are named by their path in the module that was compiled. A recompile (new
shapes) keeps counting into the same layer. With expert parallelism a rank counts the copies its
own tokens route to every expert, before the all-to-all (`ep_capacity_factor` drops are not
counted). Under CUDA-graph replay the counts still accumulate, but a graph shared by several
block instances counts into the instance it was captured with, and nothing is logged.
"""
import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from moec.runtime import expert_load as runtime


@dataclass(frozen=True)
class LayerLoad:
    """One MoE layer's expert load. Tensors are a snapshot on the layer's device."""
    layer: str
    counts: Tensor    # (E,) int64: token copies routed to each expert
    dropped: Tensor   # () int64: copies dropped by capacity routing (0 without it)
    steps: Tensor     # () int64: forward calls of the layer (micro-batches with gradient accumulation)

    @property
    def routed(self) -> Tensor:
        """() int64: copies that reached an expert (T*k per step, less the dropped ones)."""
        return self.counts.sum()

    @property
    def imbalance(self) -> Tensor:
        """() float32: busiest expert's copies over the mean (1.0 is perfectly even; nan before any)."""
        return self.counts.max().float() / self.counts.float().mean()

    def to_dict(self) -> dict:
        """Plain Python numbers (one device-to-host read)."""
        *counts, dropped, steps = torch.cat([self.counts, self.dropped[None], self.steps[None]]).tolist()
        mean = sum(counts) / len(counts)
        return {"layer": self.layer, "counts": counts, "routed": sum(counts), "dropped": dropped,
                "steps": steps, "imbalance": max(counts) / mean if mean else float("nan")}


def stats(model: torch.nn.Module | None = None) -> dict:
    """{layer: LayerLoad} for the layers of `model` (every counted layer if None), in the order
    they were first compiled or run. With `model`, layers are named by their path in it (a
    compiled decoder block's layer becomes "model.layers.3.mlp"); without, by their path in the
    compiled module, "#2", "#3"... marking a name met again (other models, other instances)."""
    out = {}
    paths = None if model is None else _paths(model)
    for name, s in runtime.slots():
        if paths is not None:
            owner = s.owner() if s.owner is not None else None
            if owner is None or id(owner) not in paths:
                continue
            name = _path_in_model(paths[id(owner)], s.owner_path, s.layer)
        E = s.num_experts
        snap = s.load.clone()    # a device copy: later steps do not change what was returned
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name}#{n}"
        out[key] = LayerLoad(key, snap[:E], snap[E], snap[E + 1])
    return out


def reset_stats(model: torch.nn.Module | None = None) -> None:
    """Zero the counts of `model`'s layers (all if None), in place: compiled graphs keep counting."""
    for s in _slots(model):
        s.load.zero_()
        s.calls = 0


def dump_stats(directory: str, model: torch.nn.Module | None = None) -> list:
    """Write expert_load.json (every layer's `to_dict`) and, with matplotlib, expert_load.png (a
    chart of each layer's copies per expert over its mean) into `directory`. Reads the counts to
    the host once. Returns the paths written."""
    rows = [load.to_dict() for load in stats(model).values()]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "expert_load.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    written = [path]
    from .draw_load import draw_expert_load
    if rows and draw_expert_load(rows, os.path.join(directory, "expert_load.png")):
        written.append(os.path.join(directory, "expert_load.png"))
    return written


def _slots(model):
    slots = [s for _, s in runtime.slots()]
    if model is None:
        return slots
    paths = _paths(model)
    return [s for s in slots if s.owner is not None and id(s.owner()) in paths]


def _paths(model) -> dict:
    """id(tensor) -> its path in `model` (torch.compile's wrapper left out)."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {id(t): name.replace("_orig_mod.", "") for name, t in named}


def _path_in_model(weight_path: str, owner_path: str, layer: str) -> str:
    """The layer's path in the model: where the compiled module sits (the weight's path in the
    model less its path in the compiled module), then the layer's path in that."""
    if not owner_path or not (weight_path == owner_path or weight_path.endswith("." + owner_path)):
        return layer
    root = weight_path[:len(weight_path) - len(owner_path)].rstrip(".")
    if layer == "<root>":
        return root or "<root>"
    return f"{root}.{layer}" if root else layer
