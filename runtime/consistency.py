"""Catching ranks that disagree about their MoE layers, at the first step, with a readable error.

Ranks that compiled different MoE configurations (another top-k, activation, capacity factor,
expert width...) would otherwise exchange rows of the wrong sizes and fail deep inside the
transport, or silently compute garbage. Two guards:

- `agree_once(group_name, text)`: all-gathers a description of the layers the first time this
  rank meets it and raises a MoecError naming the ranks that differ. It is a blocking collective,
  so it never goes inside a compiled graph, where the dense backend orders it freely among the
  all-to-alls (Inductor keeps only the collectives' own order: one rank ran a later chunk's check
  before an earlier chunk's exchange, the other after it, and both waited forever). Eager
  `ep_dispatch` calls it itself; for compiled graphs the backend calls it before the graph's first
  run, with every layer of the graph described from its example values (`describe`).
- `tag`: each count exchange carries a number naming its layer and chunk; a rank that receives
  another tag has exchanged with a rank at another point of the program (a collective dropped or
  merged by a graph rewrite on one rank only), and stops instead of reading the wrong counts.
"""
import zlib

import torch.distributed as dist

from moec.codegen import layout as layouts
from moec.codegen.errors import MoecError

# (group name, description) pairs every rank of the group agreed on. Deciding to check from local
# history is sound because EP already requires every rank to meet the same layers in the same order.
_seen: set = set()
# decisions the ranks took together while compiling, by key (see `decided_once`)
_decided: dict = {}


def describe(site: str, x, offsets, k: int, weights: list, layout: str, activation: str, alpha: float,
             limit: float, capacity_factor: float, chunk: str = "") -> str:
    """What every rank of an EP group must agree on for one MoE layer (one chunk of it); plain
    text, so an error can show the difference. Tensors may be real or fake (example values)."""
    w_up, w_gate, _, *biases = layouts.views(weights, layout)
    E, F, H = offsets.shape[0] - 1, w_up.shape[1], x.shape[1]
    has_bias = "".join("1" if b is not None else "0" for b in biases)
    mode = f"capacity_factor={capacity_factor:g}" if capacity_factor > 0 else "dropless"
    return (f"layer {site or '<unnamed>'}: E={E} k={k} H={H} F={F} gated={w_gate is not None} "
            f"biases={has_bias} act={activation}({alpha:g},{limit:g}) {mode} dtype={str(x.dtype)[6:]}"
            f"{' ' + chunk if chunk else ''}")


def tag(site: str, chunk: str) -> int:
    """The same small number on every rank for one layer's chunk (Python's hash is salted per process)."""
    return zlib.crc32(f"{site}|{chunk}".encode()) & 0x7FFFFFFF


def agree_once(group_name: str, text: str):
    """On first sight of `text`, check that every rank of the group has the same one."""
    key = (group_name, text)
    if key not in _seen:
        _agree(group_name, text)
        _seen.add(key)


def decided_once(key, decide):
    """decide() the first time this process meets `key` (a collective every rank of the group runs
    together, or the record of one just run); after that the same answer, or the same MoecError,
    with no collective.
    The first compile of a graph happens on every rank at the same step, a recompile (a new input
    shape on one rank, Dynamo's automatic dynamic shapes) may happen on one rank only: a
    collective there would wait forever for ranks that are running their graphs."""
    if key not in _decided:
        try:
            _decided[key] = (decide(), None)
        except MoecError as e:
            _decided[key] = (None, e)
    answer, error = _decided[key]
    if error is not None:
        raise error
    return answer


def decided(key):
    """What `decided_once` decided for key, or None."""
    answer, _ = _decided.get(key, (None, None))
    return answer


def forget():
    """Check every layer, and take every compile-time decision, again (for a process that changes
    models, e.g. tests)."""
    _seen.clear()
    _decided.clear()


def _agree(group_name: str, mine: str):
    group = dist.distributed_c10d._resolve_process_group(group_name)
    everyone = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(everyone, mine, group=group)
    except RuntimeError as e:
        raise MoecError(f"expert parallelism: checking that all ranks of group {group_name!r} compiled the "
                        f"same MoE layers failed ({str(e).strip().splitlines()[0]}); a rank did not reach "
                        f"them: check that every rank runs the same model and options") from e
    if any(other != mine for other in everyone):
        lines = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(everyone))
        raise MoecError(f"expert parallelism: the ranks of group {group_name!r} compiled different MoE "
                        f"layers:\n{lines}\nEvery rank must build the same model with the same moec "
                        f"options; fix the rank(s) that differ.")
