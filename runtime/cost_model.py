"""Cost model for overlap scheduling: seconds for an all-to-all and for a compute op, from a few numbers.

Plain numbers in, seconds out; nothing here sees a graph (the passes call it with bytes and flops).
    AllToAllModel      latency + the slowest rank's off-rank bytes over link bandwidth (within a host
                       and between hosts separately when both are given); cut into k chunks, each
                       chunk pays the latency again, which is what bounds k
    ComputeModel       launch overhead + roofline max(flops / peak, bytes / bandwidth), or a measured
                       time; `op` gives the `Op` record the schedule search takes, with its chunk times
    calibrate          measures those numbers on a device (and over a process group) and fits them
                       by least squares; `load_or_calibrate` caches them as JSON per device, world
                       size and backend
Units: seconds, bytes, per-second rates.

Every rank must predict the same schedule (a different chunk count on two ranks would pair up
mismatched collectives), so with a group every measured time is the slowest rank's (an all-reduce
MAX), and `load_or_calibrate` hands every rank rank 0's numbers.
"""
import datetime
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moec.codegen.errors import MoecError


@dataclass(frozen=True)
class Op:
    """One compute op around an MoE layer, as the schedule search sees it.

    A chunk of k (the op run on T/k tokens) takes `chunk_s(k)`: chunk_times[k-1] where given
    (measured, or from `ComputeModel.op`), else fixed_s + (time_s - fixed_s) / k, fixed_s being
    what every chunk pays in full (launch, weights read again). Never less than time_s / k: the
    search counts on chunking never making an op cheaper in total.
    """
    name: str
    time_s: float
    splittable: bool = True      # may run as k chunks along the token axis
    fixed_s: float = 0.0
    chunk_times: tuple = ()

    def __post_init__(self):
        if not (self.time_s >= 0 and math.isfinite(self.time_s)):
            raise MoecError(f"op {self.name!r}: time_s={self.time_s!r}; give a finite time >= 0 seconds")
        if not 0 <= self.fixed_s <= self.time_s:
            raise MoecError(f"op {self.name!r}: fixed_s={self.fixed_s} must lie in [0, time_s={self.time_s}]")
        if any(not (t >= 0 and math.isfinite(t)) for t in self.chunk_times):
            raise MoecError(f"op {self.name!r}: chunk_times {self.chunk_times} must be finite times >= 0")

    def chunk_s(self, k: int) -> float:
        if k == 1:
            return self.time_s
        if k <= len(self.chunk_times):
            t = self.chunk_times[k - 1]
        else:
            t = self.fixed_s + (self.time_s - self.fixed_s) / k
        return max(t, self.time_s / k)


@dataclass(frozen=True)
class AllToAllModel:
    """time = latency + (slowest rank's off-rank bytes) / bandwidth.

    A rank's bytes are max(sent, received): links are full duplex. With `ranks_per_host` > 0
    (ranks numbered host by host) traffic within a host and between hosts use different links
    and run at the same time: max(intra / intra_bandwidth, inter / inter_bandwidth); a bandwidth
    left 0 means `bandwidth_Bps`. Latency grows by `per_peer_latency_s` per peer.
    """
    latency_s: float
    bandwidth_Bps: float
    intra_bandwidth_Bps: float = 0.0
    inter_bandwidth_Bps: float = 0.0
    ranks_per_host: int = 0
    per_peer_latency_s: float = 0.0
    world_size: int = 0          # what a plain byte count is spread over; 0: taken from the bytes

    def __post_init__(self):
        for name in ("latency_s", "per_peer_latency_s", "intra_bandwidth_Bps", "inter_bandwidth_Bps"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise MoecError(f"AllToAllModel.{name}={getattr(self, name)!r}: give a finite number >= 0")
        if not (self.bandwidth_Bps > 0 and math.isfinite(self.bandwidth_Bps)):
            raise MoecError(f"AllToAllModel.bandwidth_Bps={self.bandwidth_Bps!r}: give a finite rate > 0 bytes/s")

    def time(self, send_bytes, chunks: int = 1, rank: int = 0) -> float:
        """Seconds for one of `chunks` equal pieces of the exchange `send_bytes`:
        a number       every rank sends this many bytes, spread evenly over the world (1/W stays)
        a list (W,)    this rank's bytes to each rank; `rank` is this rank (its entry stays local);
                       every rank is taken to receive what it sends
        a matrix (W, W) m[i][j] = bytes rank i sends rank j; the slowest rank decides."""
        if chunks < 1:
            raise MoecError(f"all-to-all in {chunks} chunks: the chunk count must be >= 1")
        return self.latency(self._world(send_bytes)) + self.transfer_s(send_bytes, rank) / chunks

    def latency(self, world_size: int) -> float:
        return self.latency_s + self.per_peer_latency_s * max(0, world_size - 1)

    def transfer_s(self, send_bytes, rank: int = 0) -> float:
        """The bandwidth part of `time` for the whole exchange (no latency), slowest rank."""
        m = self._matrix(send_bytes, rank)                       # (W, W), or (1, W) for one rank's list
        W = m.shape[1]
        host = torch.arange(W) // (self.ranks_per_host or W)
        same = host[:, None] == host[None, :]
        off = ~torch.eye(W, dtype=torch.bool)
        if m.shape[0] == 1:                                       # one rank's sends: receives mirror them
            same, off = same[rank:rank + 1], off[rank:rank + 1]
        if not self.ranks_per_host:
            return float(_duplex(m * off, m.shape[0] == 1).max()) / self.bandwidth_Bps
        intra = _duplex(m * (same & off), m.shape[0] == 1) / (self.intra_bandwidth_Bps or self.bandwidth_Bps)
        inter = _duplex(m * ~same, m.shape[0] == 1) / (self.inter_bandwidth_Bps or self.bandwidth_Bps)
        return float(torch.maximum(intra, inter).max())

    def _world(self, send_bytes) -> int:
        t = torch.as_tensor(send_bytes)
        return self.world_size if t.ndim == 0 else t.shape[-1]

    def _matrix(self, send_bytes, rank: int):
        m = torch.as_tensor(send_bytes, dtype=torch.float64)
        if m.ndim == 0:
            if self.world_size < 1:
                raise MoecError("AllToAllModel.time got one byte count but world_size is not set; give "
                                "world_size=W to the model, or per-peer bytes (a list of W)")
            m = torch.full((self.world_size, self.world_size), float(m) / self.world_size, dtype=torch.float64)
        elif m.ndim == 1:
            if not 0 <= rank < m.shape[0]:
                raise MoecError(f"all-to-all bytes: rank {rank} is outside the {m.shape[0]} peers given")
            m = m[None, :]
        elif m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise MoecError(f"all-to-all bytes of shape {tuple(m.shape)}: expected a number, a list of W "
                            f"per-peer counts or a (W, W) matrix")
        if bool((m < 0).any()) or not bool(torch.isfinite(m).all()):
            raise MoecError("all-to-all bytes must be finite and >= 0")
        return m


def _duplex(m, one_rank: bool):
    """Per rank: max(bytes sent, bytes received)."""
    return m.sum(1) if one_rank else torch.maximum(m.sum(1), m.sum(0))


@dataclass(frozen=True)
class ComputeModel:
    """time = launch_s + max(flops / flops_per_s, bytes / bytes_per_s), or a measured time.

    On an H100 (benchmarks/results/cost_model_nvidia_h100_80gb_hbm3.json) this was within 18% on
    average of eager GEMMs and adds from 11 us to 1.8 ms, whole and in 2-8 chunks; it
    overestimates small elementwise chunks (a launch overlaps the previous kernel) and
    underestimates small GEMMs (below the fitted peak). Adding the launch errs towards fewer chunks.
    """
    flops_per_s: float
    bytes_per_s: float
    launch_s: float = 0.0

    def __post_init__(self):
        if not (self.flops_per_s > 0 and self.bytes_per_s > 0 and self.launch_s >= 0):
            raise MoecError(f"ComputeModel needs flops_per_s > 0, bytes_per_s > 0 and launch_s >= 0, got {self}")

    def time(self, flops: float = 0.0, bytes: float = 0.0, measured_s: float | None = None) -> float:
        if measured_s is not None:
            return measured_s
        return self.launch_s + max(flops / self.flops_per_s, bytes / self.bytes_per_s)

    def op(self, name: str, flops: float = 0.0, bytes: float = 0.0, fixed_bytes: float = 0.0,
           splittable: bool = True, k_max: int = 16, measured_s: float | None = None) -> Op:
        """An `Op` with chunk times for k = 1..k_max: a chunk does flops/k and reads fixed_bytes
        (weights) in full plus 1/k of the rest. A measured time scales the whole curve."""
        if not 0 <= fixed_bytes <= bytes:
            raise MoecError(f"op {name!r}: fixed_bytes={fixed_bytes} must lie in [0, bytes={bytes}]")
        curve = [self.time(flops / k, fixed_bytes + (bytes - fixed_bytes) / k) for k in range(1, k_max + 1)]
        scale = 1.0 if measured_s is None else measured_s / curve[0]
        times = tuple(t * scale for t in curve)
        return Op(name, times[0], splittable, fixed_s=min(times[0], self.launch_s * scale), chunk_times=times)


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` measured: the compute model, the all-to-all model (None without a group
    of 2+ ranks), and where: key = device name, world size and backend."""
    key: str
    compute: ComputeModel
    all_to_all: AllToAllModel | None
    when: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        d = json.loads(text)
        a2a = d.get("all_to_all")
        return cls(d["key"], ComputeModel(**d["compute"]), AllToAllModel(**a2a) if a2a else None, d.get("when", ""))

    @classmethod
    def load(cls, path) -> "Calibration":
        try:
            return cls.from_json(Path(path).read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MoecError(f"cannot read a moec calibration from {path}: {e}; delete the file to measure "
                            f"again") from e


# Sizes measured per device type: big enough that the bandwidth term dominates the largest one,
# small enough that calibration takes about a second.
_SIZES = {
    "cpu": dict(matmul=(64, 128, 192, 256), copy=(1 << 16, 1 << 18, 1 << 20), a2a=(1 << 12, 1 << 16, 1 << 20)),
    "cuda": dict(matmul=(1024, 2048, 4096, 6144), copy=(1 << 22, 1 << 24, 1 << 26),
                 a2a=(1 << 16, 1 << 20, 1 << 24, 1 << 26)),
}


def calibrate(device, group=None, timer=None, dtype: torch.dtype | None = None) -> Calibration:
    """Measure matmul flops/s, copy bandwidth, launch overhead and, with a process group of 2+
    ranks, all-to-all latency and bandwidth; fit latency + amount / rate by least squares.

    `timer(what, amount, fn) -> seconds per call of fn` ("matmul" flops, "copy" bytes, "launch" 0,
    "all_to_all" off-rank bytes per rank); by default fn is run and timed (CUDA events on a GPU).
    With a group every rank must call this; each time is the slowest rank's."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = _SIZES["cuda" if device.type == "cuda" else "cpu"]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    world = dist.get_world_size(group) if group is not None else 1
    slowest = _slowest(group, device)
    timer = timer or _Stopwatch(device, agree=slowest)
    es = torch.finfo(dtype).bits // 8

    mats = [[torch.randn(n, n, device=device, dtype=dtype) for _ in range(3)] for n in sizes["matmul"]]
    flops = [2.0 * n ** 3 for n in sizes["matmul"]]
    times = _fastest(timer, slowest, "matmul", flops, [lambda a=a, b=b, c=c: torch.mm(a, b, out=c) for a, b, c in mats])
    _, per_flop = fit_latency_rate(flops, times, "matmul")

    vecs = [(torch.randn(n, device=device, dtype=dtype), torch.empty(n, device=device, dtype=dtype))
            for n in sizes["copy"]]
    nbytes = [2.0 * n * es for n in sizes["copy"]]                 # read + write
    times = _fastest(timer, slowest, "copy", nbytes, [lambda x=x, y=y: y.copy_(x) for x, y in vecs])
    _, per_byte = fit_latency_rate(nbytes, times, "copy")

    tiny = torch.zeros(1, device=device, dtype=dtype)
    launch, = _fastest(timer, slowest, "launch", [0.0], [lambda: tiny.add_(1)])
    compute = ComputeModel(1.0 / per_flop, 1.0 / per_byte, launch)

    a2a = _calibrate_all_to_all(group, device, dtype, sizes["a2a"], timer, slowest) if world > 1 else None
    return Calibration(calibration_key(device, group), compute, a2a,
                       datetime.datetime.now().isoformat(timespec="seconds"))


def _calibrate_all_to_all(group, device, dtype, sizes, timer, slowest, retries: int = 1) -> AllToAllModel:
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise MoecError("all-to-all calibration over an NCCL group needs a CUDA device; pass device='cuda'")
    es = torch.finfo(dtype).bits // 8
    counts = [max(world, total // es // world * world) for total in sizes]   # per-rank elements, a multiple of W
    bufs = [(torch.randn(n, device=device, dtype=dtype), torch.empty(n, device=device, dtype=dtype)) for n in counts]
    off = [n * es * (world - 1) / world for n in counts]
    dist.barrier(group)
    times = _fastest(timer, slowest, "all_to_all", off,
                     [lambda x=x, y=y: dist.all_to_all_single(y, x, group=group) for x, y in bufs])
    try:
        latency, per_byte = fit_latency_rate(off, times, "all-to-all")
    except MoecError:
        if retries == 0:
            raise
        # The link's latency (and its noise) hid the bandwidth term at these sizes: a loaded host
        # or a slow transport. Measure 8x larger; every rank sees the same (slowest) times, so
        # every rank retries together.
        return _calibrate_all_to_all(group, device, dtype, [8 * n for n in sizes], timer, slowest, retries - 1)
    return AllToAllModel(latency, 1.0 / per_byte, world_size=world)


def _fastest(timer, slowest, what, amounts, fns, passes: int = 3) -> list:
    """Per size, the least over `passes` of the slowest rank's time. The passes sweep every size in
    turn, so a burst of load elsewhere on the machine lands on one pass of several sizes, not on
    every pass of one size, and the least drops it (load only ever adds time)."""
    best = [math.inf] * len(fns)
    for _ in range(passes):
        for i, (amount, fn) in enumerate(zip(amounts, fns)):
            best[i] = min(best[i], slowest(timer(what, amount, fn)))
    return best


def fit_latency_rate(amounts, times, what: str) -> tuple:
    """Least-squares time = latency + amount * per_unit -> (latency >= 0, per_unit > 0). A
    negative intercept (noise) is refit through the origin."""
    n = len(amounts)
    if n < 2 or len(times) != n:
        raise MoecError(f"{what} calibration needs 2+ (size, time) samples, got {n}")
    if any(not (t > 0 and math.isfinite(t)) for t in times):
        raise MoecError(f"{what} calibration measured times {times}: every time must be finite and > 0")
    mx, mt = sum(amounts) / n, sum(times) / n
    sxx = sum((a - mx) ** 2 for a in amounts)
    slope = sum((a - mx) * (t - mt) for a, t in zip(amounts, times)) / sxx if sxx else 0.0
    intercept = mt - slope * mx
    if intercept < 0:
        slope, intercept = sum(a * t for a, t in zip(amounts, times)) / sum(a * a for a in amounts), 0.0
    if not slope > 0:
        raise MoecError(f"{what} calibration: time did not grow with size ({list(zip(amounts, times))}); "
                        f"the machine was too busy or the sizes too small to measure; calibrate again on an "
                        f"idle machine")
    return intercept, slope


def calibration_key(device, group=None) -> str:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    world = dist.get_world_size(group) if group is not None else 1
    backend = dist.get_backend(group) if group is not None else "none"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-ws{world}-{backend}")


def cache_root(cache_dir: str | None = None) -> Path:
    """The folder moec keeps per-machine measurements in (calibration/, tuning/): cache_dir
    (moec's Config.cache_dir, MOEC_CACHE_DIR), else ~/.cache/moec."""
    return Path(cache_dir or Path.home() / ".cache" / "moec").expanduser()


def calibration_path(device, group=None, cache_dir: str | None = None) -> Path:
    """Where `load_or_calibrate` caches the calibration for (device, world size, backend)."""
    return cache_root(cache_dir) / "calibration" / f"{calibration_key(device, group)}.json"


def cached_calibration(device, group=None, cache_dir: str | None = None) -> Calibration | None:
    """This rank's cached calibration, if any: no measurement and no collective."""
    path = calibration_path(device, group, cache_dir)
    return Calibration.load(path) if path.exists() else None


def load_or_calibrate(device, group=None, cache_dir: str | None = None, timer=None, refresh: bool = False,
                      dtype: torch.dtype | None = None) -> Calibration:
    """The cached calibration for (device, world size, backend) under cache_dir/calibration/
    (default ~/.cache/moec; moec's Config.cache_dir, MOEC_CACHE_DIR, is what the passes pass),
    measuring and caching it first where there is none or refresh is set. With a group, rank 0
    decides and every rank gets rank 0's numbers (every rank must call this)."""
    path = calibration_path(device, group, cache_dir)
    rank0 = group is None or dist.get_rank(group) == 0
    cached = _readable(path) if rank0 and path.exists() and not refresh else None
    measure = cached is None if group is None else _broadcast(group, device, cached is None)
    result = calibrate(device, group, timer, dtype) if measure else cached
    if group is not None:
        result = _broadcast(group, device, result)
    if rank0 and measure:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{time.monotonic_ns()}")
        tmp.write_text(result.to_json())
        tmp.replace(path)                                        # atomic: another process may read it
    return result


def _readable(path) -> Calibration | None:
    """The cached calibration, or None (measure again) where the file cannot be read: raising here
    would leave the other ranks waiting in the broadcast for rank 0's decision."""
    try:
        return Calibration.load(path)
    except MoecError as e:
        logging.getLogger("moec").warning("%s; measuring again", e)
        return None


def _broadcast(group, device, obj):
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group,
                               device=device if dist.get_backend(group) == "nccl" else None)
    return box[0]


def _slowest(group, device):
    """seconds on this rank -> the largest over the group (identity without one)."""
    if group is None or dist.get_world_size(group) == 1:
        return lambda t: t
    dev = device if dist.get_backend(group) == "nccl" else torch.device("cpu")

    def reduce(t):
        box = torch.tensor([float(t)], dtype=torch.float64, device=dev)
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
        return float(box.item())
    return reduce


class _Stopwatch:
    """The default timer: `reps` back-to-back calls filling about budget_s, per call."""

    def __init__(self, device, agree, budget_s: float = 0.02):
        self.device, self.agree, self.budget_s = device, agree, budget_s

    def __call__(self, what, amount, fn) -> float:
        fn()                                                     # warm up (allocator, kernel choice)
        one = self._time(fn, 1)
        # every rank must run a collective equally often: the group agrees on the count
        reps = int(self.agree(max(1, min(200, int(self.budget_s / max(one, 1e-7))))))
        return self._time(fn, reps) / reps

    def _time(self, fn, reps) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return time.perf_counter() - t0
