"""Predict one MoE layer's forward time with expert parallelism on 8 to 1024 GPUs, three ways.

    python -m moec.runtime.simulate --hidden 4096 --ffn 1408 --experts 64 --top-k 8 --worlds 8,64,512

For each world size it prints the predicted layer time with no overlap (k=1), with the experts
alone pipelined against the all-to-alls (Tutel-style), and with the full schedule that also
chunks the splittable ops around them (Lancet-style, `schedule_search.search`), plus the exposed
all-to-all time of each and the chunk count chosen. Link speeds, latencies and compute rates are
flags (defaults: H100 SXM hosts of 8, NVLink 450 GB/s and one 400 Gb/s NIC per GPU, compute rates
measured on an H100); a calibration file from `load_or_calibrate` replaces the compute rates.
These are predictions of a model, not measurements: they rank choices, and their absolute
numbers are only as good as the flags.

The layer, per rank (T tokens, H hidden, F expert width, E experts, k top-k, d bytes per value):
    pre     attention core (not chunked: each query attends the whole sequence), out-proj (T,H)x(H,H),
            residual add, norm, router (T,H)x(H,E), permute into expert order (T*k rows)
    a2a     dispatch: T*k*H*d bytes sent per rank, spread over the ep ranks of the expert group
    experts gated FFN on the copies received, 6*H*F flops per copy, every chunk reads its weights
    a2a     combine: the same bytes back
    post    unpermute + weighted sum, residual add, next norm, next QKV projection (T,H)x(H,3H)
Expert placement: `--experts-per-rank e` puts the E experts on ep = E/e ranks (one expert group;
the world holds world/ep copies of it); by default ep = min(world, E). Uneven routing: with
`--imbalance f` (max/mean tokens per expert) the hottest expert gets f times the mean and its rank
(f + e - 1)/e times the mean rank's tokens: it receives that much more and computes that much
longer, and the slowest rank decides.
"""
import argparse
import json
import sys
from dataclasses import dataclass, fields

import torch

from moec.codegen.errors import MoecError

from .cost_model import AllToAllModel, Calibration, ComputeModel, Op
from .schedule_search import LayerCosts, predict, search


@dataclass(frozen=True)
class Setup:
    """Every number the prediction uses; the CLI flags are these fields."""
    tokens: int = 4096            # tokens per rank per layer call
    hidden: int = 4096
    ffn: int = 1408               # expert FFN width
    experts: int = 64
    top_k: int = 8
    dtype_bytes: int = 2
    seq_len: int = 4096           # for the attention estimate
    attention_ms: float = -1.0    # attention core time; < 0: estimated from flops
    experts_per_rank: int = 0     # 0: E / min(world, E)
    imbalance: float = 1.0        # max / mean tokens per expert
    gpus_per_host: int = 8
    nvlink_GBps: float = 450.0    # per GPU, one direction
    ib_GBps: float = 50.0         # per GPU, one direction
    latency_us: float = 20.0      # all-to-all base latency
    per_peer_us: float = 0.2      # added per peer (assumed; calibrate to replace)
    tflops: float = 750.0         # bf16 matmul rate   } measured on an H100 by
    hbm_GBps: float = 3000.0      # copy, read + write } benchmarks/check_cost_model.py
    launch_us: float = 11.0       # per eager launch   }
    k_max: int = 8


def expert_group(s: Setup, world: int) -> tuple:
    """-> (ep ranks, experts per rank)."""
    e = s.experts_per_rank or max(1, s.experts // min(world, s.experts))
    if s.experts % e:
        raise MoecError(f"--experts-per-rank {e} does not divide --experts {s.experts}")
    ep = s.experts // e
    if ep > world or world % ep:
        raise MoecError(f"{s.experts} experts at {e} per rank need an expert group of {ep} ranks, which does not "
                        f"divide a world of {world}; change --experts-per-rank or --worlds")
    return ep, e


def layer(s: Setup, world: int, compute: ComputeModel) -> tuple:
    """-> (LayerCosts, AllToAllModel, ep, experts per rank) for one rank of the slowest kind."""
    ep, e = expert_group(s, world)
    T, H, F, E, k, d = s.tokens, s.hidden, s.ffn, s.experts, s.top_k, s.dtype_bytes
    rank_load = min(ep, (s.imbalance + e - 1) / e)
    op = lambda name, flops, nbytes, fixed=0.0: compute.op(name, flops, nbytes, fixed, k_max=s.k_max)
    attention = s.attention_ms * 1e-3 if s.attention_ms >= 0 else compute.time(2.0 * T * s.seq_len * H)  # causal
    pre = (Op("attention", attention, splittable=False),
           op("out_proj", 2.0 * T * H * H, (2 * T * H + H * H) * d, H * H * d),
           op("residual", 0, 3 * T * H * d),
           op("norm", 0, 2 * T * H * d),
           op("router", 2.0 * T * H * E, (T * H + H * E + T * E) * d, H * E * d),
           op("permute", 0, 2 * T * k * H * d))
    Tl = T * k * rank_load                                       # copies the slowest rank computes
    weights = 3 * H * F * e * d
    experts = op("experts", 6.0 * Tl * H * F, weights + Tl * (2 * H + 6 * F) * d, weights)
    post = (op("unpermute", 0, (T * k * H + 2 * T * H) * d),
            op("residual2", 0, 3 * T * H * d),
            op("next_norm", 0, 2 * T * H * d),
            op("next_qkv", 2.0 * T * H * 3 * H, (T * H + 3 * H * H + 3 * T * H) * d, 3 * H * H * d))
    send = torch.full((ep, ep), T * k * H * d / ep, dtype=torch.float64)
    if ep > 1 and rank_load != 1:            # rank 0 holds the hot expert; senders' totals unchanged
        send[:, 0] *= rank_load
        send[:, 1:] *= (ep - rank_load) / (ep - 1)
    a2a = AllToAllModel(s.latency_us * 1e-6, s.ib_GBps * 1e9, intra_bandwidth_Bps=s.nvlink_GBps * 1e9,
                        inter_bandwidth_Bps=s.ib_GBps * 1e9, ranks_per_host=s.gpus_per_host,
                        per_peer_latency_s=s.per_peer_us * 1e-6)
    return LayerCosts(pre, send, experts, send.T.contiguous(), post), a2a, ep, e


def compare(s: Setup, world: int, compute: ComputeModel) -> dict:
    """The three schedules for one world size."""
    costs, a2a, ep, e = layer(s, world, compute)
    whole = LayerCosts([Op(o.name, o.time_s, False) for o in costs.pre], costs.dispatch_bytes, costs.experts,
                       costs.combine_bytes, [Op(o.name, o.time_s, False) for o in costs.post])
    return {"world": world, "ep": ep, "experts_per_rank": e, "serial": predict(costs, a2a, 1),
            "tutel": search(whole, a2a, s.k_max), "full": search(costs, a2a, s.k_max)}


def add_setup_flags(p: argparse.ArgumentParser) -> None:
    """The `Setup` fields as --flags, and --calibration."""
    for f in fields(Setup):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"(default {f.default})")
    p.add_argument("--calibration", help="a JSON file from moec.runtime.load_or_calibrate: its compute rates "
                                         "replace --tflops/--hbm-GBps/--launch-us")


def setup_from(a: argparse.Namespace) -> tuple:
    """-> (Setup, ComputeModel) from the flags `add_setup_flags` added."""
    s = Setup(**{f.name: getattr(a, f.name) for f in fields(Setup)})
    compute = Calibration.load(a.calibration).compute if a.calibration else \
        ComputeModel(s.tflops * 1e12, s.hbm_GBps * 1e9, s.launch_us * 1e-6)
    return s, compute


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moec.runtime.simulate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    add_setup_flags(p)
    p.add_argument("--worlds", default="8,16,32,64,128,256,512,1024", help="world sizes, comma-separated")
    p.add_argument("--explain", action="store_true", help="say why each full schedule was chosen")
    p.add_argument("--json", help="also write the rows and schedules here")
    a = p.parse_args(argv)
    try:
        s, compute = setup_from(a)
        rows = [compare(s, int(w), compute) for w in a.worlds.split(",")]
    except MoecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MoE layer forward per rank: T={s.tokens} H={s.hidden} F={s.ffn} E={s.experts} top-k={s.top_k} "
          f"d={s.dtype_bytes}B imbalance={s.imbalance}; compute {compute.flops_per_s / 1e12:.0f} TFLOP/s, "
          f"{compute.bytes_per_s / 1e9:.0f} GB/s, launch {compute.launch_s * 1e6:.1f} us; NVLink {s.nvlink_GBps} "
          f"GB/s, IB {s.ib_GBps} GB/s, {s.gpus_per_host} GPUs/host, a2a latency {s.latency_us} us + "
          f"{s.per_peer_us} us/peer")
    head = (f"{'world':>6} {'ep':>5} {'e/rank':>6} {'a2a ms':>7} | {'serial ms':>9} {'exposed':>7} | "
            f"{'tutel ms':>8} {'k':>2} {'exposed':>7} | {'full ms':>7} {'k':>2} {'exposed':>7} {'gain':>5} | chunked")
    print(head)
    print("-" * len(head))
    ms = lambda x: f"{x * 1e3:.3f}"
    for r in rows:
        ser, tut, full = r["serial"], r["tutel"], r["full"]
        print(f"{r['world']:>6} {r['ep']:>5} {r['experts_per_rank']:>6} {ms(ser.comm_s):>7} | "
              f"{ms(ser.step_s):>9} {ms(ser.exposed_comm_s):>7} | {ms(tut.step_s):>8} {tut.k:>2} "
              f"{ms(tut.exposed_comm_s):>7} | {ms(full.step_s):>7} {full.k:>2} {ms(full.exposed_comm_s):>7} "
              f"{1 - full.step_s / ser.step_s:>5.0%} | {','.join(full.chunked_ops()) or '-'}")
        if a.explain:
            print("       " + full.explain().replace("\n", "\n       "))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"setup": s.__dict__, "compute": compute.__dict__,
                       "rows": [{"world": r["world"], "ep": r["ep"], "experts_per_rank": r["experts_per_rank"],
                                 **{v: r[v].as_dict() for v in ("serial", "tutel", "full")}} for r in rows]},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
