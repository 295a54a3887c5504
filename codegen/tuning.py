"""Launch settings: one function of the shapes per kernel, pinnable in tests, tunable on a GPU.

Key: (kernel, E, k, H, F, dtype, device name, token bucket), the bucket being T rounded up to a
power of two, so a new token count never triggers a new tuning run or a recompile (the block
sizes are constexprs; the counts per expert stay on the device). Lookup order: pinned (tests) ->
tuned this process, loaded from the user's cache (<cache_dir>/tuning, read when moec compiles),
or shipped in codegen/tuned/ for this GPU (both written by benchmarks/tune_kernels.py) ->
shipped for another GPU of the same architecture (the H200 reads the H100's table: both sm90) ->
the same two at the nearest tuned bucket (within a factor of 4, same regime: `_nearest`) -> the
heuristic table below.
"""
import contextlib
import functools
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """Block sizes of one launch; for GEMMs m = grouped rows, n = output columns, k = reduction."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    epilogue_split: int = 1     # dh only: 2 / 4 run the epilogue over column halves / quarters (registers)
    tma: bool = False           # weight tiles (wgrad: operand row blocks; persistent: stores) through TMA (sm90+)
    persistent: int = 0         # wgrad only: programs per SM walking the tiles (0: one program per tile)
    row_descs: bool = False     # wgrad, down: grouped rows through descriptors made per expert (sm90+)
    max_regs: int = 0           # dh only: registers a thread at most (ptxas's .maxnreg; 0: the compiler's choice)


_pinned: dict = {}
_tuned: dict = {}


def bucket(tokens: int) -> int:
    return 1 << max(0, int(tokens) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _device_name(device) -> str:
    # asked on every launch; the driver query costs more than the rest of a decode-size lookup
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=None)
def _arch(device) -> str:
    major, minor = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    return f"sm{major}{minor}"


def key(kernel, E, k, H, F, dtype, device, tokens, gpu=None):
    """`gpu`: the device's name by default; an architecture ("sm90") for the shipped fallback."""
    return f"{kernel}|E{E}|k{k}|H{H}|F{F}|{str(dtype)[6:]}|{gpu or _device_name(device)}|T{bucket(tokens)}"


def tile(kernel, E, k, H, F, dtype, device, tokens) -> Tile:
    """The launch settings of `kernel` for this layer and token count."""
    return _lookup(kernel, E, k, H, F, dtype, device, tokens)[0]


def tile_on(kernel, E, k, H, F, dtype, gpu, arch, tokens) -> Tile:
    """`tile` as the GPU named `gpu` (of architecture `arch`, e.g. "sm90") answers it: pinned ->
    tuned for it -> shipped for its architecture -> those at the nearest bucket -> the heuristic table. benchmarks/ptxas_report.py
    asks for a GPU this machine does not have."""
    return _lookup_on(kernel, E, k, H, F, dtype, gpu, arch, tokens)[0]


def _lookup(kernel, E, k, H, F, dtype, device, tokens):
    """-> (Tile, where it was found: "pinned", the key of a table entry, "arch", "interpreter" or
    "heuristic"): `tile`'s answer and what `origin` names."""
    if device.type == "cuda":
        return _lookup_on(kernel, E, k, H, F, dtype, _device_name(device), _arch(device), tokens)
    if kernel in _pinned:
        return _pinned[kernel], "pinned"
    own, _ = _keys(kernel, E, k, H, F, dtype, _device_name(device), _arch(device), bucket(tokens))
    found = _tuned.get(own)
    if found is not None:
        return found, own
    return Tile(32, 32, 32, 1, 1), "interpreter"     # few, small programs keep the tests fast


def _lookup_on(kernel, E, k, H, F, dtype, gpu, arch, tokens):
    if kernel in _pinned:
        return _pinned[kernel], "pinned"
    if not _shipped_loaded:
        _load_shipped()
    own, by_arch = _keys(kernel, E, k, H, F, dtype, gpu, arch, bucket(tokens))
    found = _tuned.get(own)
    if found is not None:
        return found, own
    found = _by_arch.get(by_arch)   # a table shipped for another GPU of this architecture (H200: the H100's)
    if found is not None:
        return found, "arch"
    for table, where in ((_tuned, ""), (_by_arch, "arch")):
        near = _nearest(table, own if table is _tuned else by_arch, k / E)
        found = None if near is None else table.get(near)   # the cache's key can be gone from a replaced table
        if found is not None:
            return found, where + near
    return _default(kernel, tokens * k / E, dtype, arch), "heuristic"


_near_cache: dict = {}


def _nearest(table, want, k_over_e):
    """The key of `table`'s entry for the same kernel and layer at the nearest tuned token bucket
    within a factor of 4 of `want`'s (the smaller on a tie), in the same regime as the heuristic
    table's (decode: <= 32 rows per expert, or not), or None. A tile tuned at 4096 tokens suits 8192
    better than the heuristic one: the tables hold the sizes someone tuned, users run others. Cached
    per table state: asked on every launch of an untuned size."""
    state = (id(table), len(table), want)
    hit = _near_cache.get(state, _near_cache)
    if hit is not _near_cache:
        return hit
    prefix, wanted = want.rsplit("|T", 1)
    wanted = int(wanted)
    small = wanted * k_over_e <= 32
    best = None
    for name in table:
        head, _, b = name.rpartition("|T")
        if head != prefix:
            continue
        b = int(b)
        dist = abs(b.bit_length() - wanted.bit_length())
        if dist <= 2 and (b * k_over_e <= 32) == small and (best is None or (dist, b) < best[:2]):
            best = (dist, b, name)
    if len(_near_cache) > 4096:
        _near_cache.clear()
    _near_cache[state] = found = best[2] if best else None
    return found


@functools.lru_cache(maxsize=4096)
def _keys(kernel, E, k, H, F, dtype, gpu, arch, tokens_bucket):
    """(this GPU's key, its architecture's key): built once per layer and bucket, not per launch
    (a launch's host time counts at decode sizes); the tables themselves are read fresh."""
    return (key(kernel, E, k, H, F, dtype, None, tokens_bucket, gpu=gpu),
            key(kernel, E, k, H, F, dtype, None, tokens_bucket, gpu=arch))


# Before Hopper mma.sync keeps the accumulators in every thread's registers beside the operand
# fragments: on sm_80 the dh kernel's (64, 128) tile at four warps, with its five-tile epilogue,
# spilled 232-512 bytes a thread, and the input gradient's two A/B pairs at (128, 128, 64) 24 (8 to
# 232 at other (128 | 64, 64 | 128, 64) tiles, GPT-OSS's transposed weights the worst). Eight warps
# for dh and a (128, 64, 32) input-gradient tile spill none (ptxas_report.py --arch 80 at Qwen3,
# OLMoE, GPT-OSS and Mixtral widths, Triton 3.6; Triton 3.9 spills 16 bytes of the latter in a test
# layer; test_compile_sm90.py keeps them under 64). Untimed: no A100 here.
_PRE_HOPPER = {"dh": Tile(64, 128, 64, 8, 3, 2), "down_dx": Tile(128, 64, 32, 8, 3)}


def _default(kernel, rows_per_expert, dtype, arch="sm90"):
    """Shipped table for Hopper-class GPUs, by average rows per expert (decode vs. prefill/train),
    with the large tiles that spill before Hopper replaced there (`_PRE_HOPPER`)."""
    small = rows_per_expert <= 32
    if dtype == torch.float32:                     # 4-byte operands: half the tile bytes
        return Tile(16, 32, 64, 4, 2) if small else Tile(64, 64, 32, 4, 2)
    table = {  # kernel: (decode tile, large tile)
        "gate_up": (Tile(16, 64, 128, 4, 3), Tile(128, 64, 64, 8, 3)),     # two accumulators
        "gate_up_bwd": (Tile(16, 64, 64, 4, 2), Tile(64, 64, 64, 4, 2)),   # three accumulators
        "down": (Tile(16, 64, 128, 4, 3), Tile(128, 128, 64, 8, 3)),
        "dh": (Tile(16, 64, 128, 4, 3), Tile(64, 128, 64, 4, 3, 2)),       # one accumulator, 5-tile epilogue
        "down_dx": (Tile(16, 64, 64, 4, 3), Tile(128, 128, 64, 8, 3)),     # two A/B pairs
        "wgrad": (Tile(64, 64, 32, 4, 2), Tile(128, 128, 32, 8, 3)),
        "wgrad_dual": (Tile(64, 64, 32, 4, 2), Tile(128, 64, 32, 8, 3)),
    }
    if not small and kernel in _PRE_HOPPER and _arch_number(arch) < 90:
        return _PRE_HOPPER[kernel]
    return table[kernel][0 if small else 1]


def _arch_number(arch) -> int:
    """"sm80" -> 80; the CPU's "sm00" (the interpreter) counts as Hopper: tests run the shipped tiles."""
    digits = "".join(ch for ch in str(arch) if ch.isdigit())
    return int(digits) if digits and int(digits) else 90


@contextlib.contextmanager
def pin(**tiles: Tile):
    """Force launch settings by kernel name (tests use this to cut partial tiles)."""
    saved = dict(_pinned)
    _pinned.update(tiles)
    try:
        yield
    finally:
        _pinned.clear()
        _pinned.update(saved)


def tune(kernel, layer, dtype, device, tokens, run, candidates, rep_ms=20, bench=None, tol=2e-2,
         report=None):
    """Time `run(tile)` for each candidate Tile (with `bench(fn) -> ms`, default triton's
    do_bench); keep the fastest for this key. GPU only. Where `run` returns the tensors it wrote,
    a candidate whose values differ from the first candidate's (the current choice) by more than
    `tol` of their largest magnitude is refused, with a warning: a compiler can miscompile one tile
    (Triton 3.6's Hopper warp specialization did, 2026-12-06), and speed alone would pick it.
    report(cand, ms): told each candidate's time (ms None: refused or did not fit)."""
    import triton.testing
    bench = bench or (lambda fn: triton.testing.do_bench(fn, rep=rep_ms, return_mode="median"))
    best, best_ms, want = None, float("inf"), None
    note = report or (lambda cand, ms: None)
    for cand in candidates:
        try:
            got = run(cand)
            if isinstance(got, (list, tuple)) and got:
                got = [g.detach().float().clone() for g in got]
                if want is None:
                    want = got
                elif _differs(got, want, tol):
                    warnings.warn(f"moec tuning {kernel}: {cand} gives other values than {candidates[0]}; refused")
                    note(cand, None)
                    continue
            ms = bench(lambda: run(cand))
        except Exception:  # a candidate that does not fit (shared memory, registers) is skipped
            note(cand, None)
            continue
        note(cand, ms)
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is not None:
        k = key(kernel, *layer, dtype, device, tokens)
        _tuned[k] = best
        _loaded_from.pop(k, None)
    return best, best_ms


def _differs(got, want, tol) -> bool:
    return any(g.shape != w.shape or not torch.isfinite(g).all() or
               (g - w).abs().max().item() > tol * max(w.abs().max().item(), 1e-6) for g, w in zip(got, want))


_SHIPPED = os.path.join(os.path.dirname(__file__), "tuned")      # tuned_<gpu>_<arch>.json, committed
_shipped_loaded = False
_by_arch: dict = {}     # shipped entries keyed by architecture instead of GPU name
_shipped_keys: set = set()


def _load_shipped():
    """Merge the committed tables once; entries tuned in this process take precedence. Each
    table also serves, by the architecture in its file name, GPUs it was not tuned on: tiles
    suit a kind of SM more than one card's bandwidth, and beat the heuristic table."""
    global _shipped_loaded
    _shipped_loaded = True
    own = dict(_tuned)
    for path in _tables(_SHIPPED):
        table = _read(path)
        _tuned.update(table)
        _shipped_keys.update(table)
        arch = re.search(r"_(sm\d+)\.json$", path)
        if arch:
            _by_arch.update({_with_gpu(k, arch.group(1)): v for k, v in table.items()})
    _tuned.update(own)


def _tables(folder) -> list:
    """The JSON tables in `folder`, in name order (none if it does not exist)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, name) for name in names if name.endswith(".json")]


def _with_gpu(k, gpu):
    parts = k.split("|")
    parts[-2] = gpu
    return "|".join(parts)


_dirs_loaded: set = set()


def load_dir(folder):
    """Merge every JSON table in `folder`, once per process: where moec keeps the tables a user's
    tuning runs wrote (benchmarks/tune_kernels.py saves to <cache_dir>/tuning), read at compile
    time, so tuning persists across processes and never runs at run time. They override the
    shipped tables (loaded before them or after, own entries win there)."""
    folder = os.path.abspath(folder)
    if folder in _dirs_loaded:
        return
    _dirs_loaded.add(folder)
    for path in _tables(folder):
        load(path)


def save(path, keys=None):
    """Write the table (only `keys`, if given: a user's file should not freeze copies of shipped
    entries that a later moec improves)."""
    with open(path, "w") as f:
        json.dump({k: asdict(v) for k, v in _tuned.items() if keys is None or k in keys}, f, indent=1)


def load(path):
    """Merge a cache written by `save` (missing file: nothing to do)."""
    if os.path.exists(path):
        table = _read(path)
        _tuned.update(table)
        _loaded_from.update(dict.fromkeys(table, path))


_loaded_from: dict = {}     # key -> the user table it was last read from (`origin`)


def origin(kernel, E, k, H, F, dtype, device, tokens) -> str:
    """Where `tile` gets this launch's settings: "pinned", a user table's path, "tuned here",
    "shipped", "shipped for <arch>", "heuristic" or "interpreter". Benchmarks print it beside their
    timings: a stale user table overrides the shipped one in every compiled call (2026-12-06: a
    one-token TMA tile from an old cache ran in a whole session's decode timings)."""
    where = _lookup(kernel, E, k, H, F, dtype, device, tokens)[1]
    near = ""
    if "|" in where and not where.endswith(f"|T{bucket(tokens)}"):
        near = f" (the T{where.rpartition('|T')[2]} bucket's)"
    if where.startswith("arch"):
        return f"shipped for {_arch(device)}{near}"
    if "|" in where:    # a table entry's key
        return (_loaded_from.get(where) or ("shipped" if where in _shipped_keys else "tuned here")) + near
    return where


def _read(path) -> dict:
    """A table's entries. Settings this moec does not know (a table written by another version) are
    left out of their entry, with a warning: its other settings still beat the heuristic table."""
    known = set(Tile.__dataclass_fields__)
    with open(path) as f:
        table = json.load(f)
    unknown = sorted({n for v in table.values() for n in v} - known)
    if unknown:
        warnings.warn(f"moec: {path} has launch settings this version does not know ({', '.join(unknown)}); "
                      f"they are ignored (re-run benchmarks/tune_kernels.py to replace them)")
    return {k: Tile(**{n: x for n, x in v.items() if n in known}) for k, v in table.items()}
