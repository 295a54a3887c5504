"""Expert parallelism over the ranks of one host (issues 4 and 5): a small HF MoE causal LM (two
decoder layers, attention + MoE, at real widths, bf16), forward + backward, T tokens per rank.

    single      the same model on this rank's GPU alone, every expert local (moec, no ep_group)
    ep          moec with ep_group, no overlap: ep_chunks=1, wgrad_schedule off
    ep_tutel    capacity routing (factor 2, as Tutel runs it: a random router's copies rarely
                overflow, but may), the slots cut in 4 pieces: the Tutel overlap of expert compute
                with the all-to-alls only (wgrad_schedule off)
    ep_lancet_tokens  moec's schedule with the chunks cut in tokens only (ep_chunk_by="tokens"): the
                attention stays whole, outside the pipeline
    ep_lancet   dropless, moec's whole schedule: the cost model's k chunks (tokens, or whole sequences
                with the attention in them) over the layer and its neighbours, weight gradients
                under the backward's all-to-alls

Per variant: step time (median of CUDA-event timed steps), all-to-all kernel time and the part of it
no compute kernel covers (exposed), from a torch.profiler trace of a few steps; for ep_lancet the
cost model's predicted step time of each layer (`schedule_search`). Each EP variant is also checked
against `single` on the same tokens: logits, and the gradient of a dense weight (the embedding),
which with EP is per rank, as without it.

    torchrun --nproc-per-node 2 benchmarks/bench_ep.py --out DIR        # NCCL on GPUs
    torchrun --nproc-per-node 2 benchmarks/bench_ep.py --cpu --tiny     # gloo smoke run, tiny model

Keep NCCL's multicast off on the device machines (NCCL_NVLS_ENABLE=0, see the device README).
Rank 0 writes bench_ep.json, bench_ep.md and bench_ep.png (step time and exposed all-to-all time).
"""
import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))

SHAPES = {   # real widths, few decoder layers, a small vocabulary: the MoE layers are most of the time
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        norm_topk_prob=True, decoder_sparse_step=1)),
    "deepseek": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=7168, moe_intermediate_size=2048, intermediate_size=18432, n_routed_experts=256,
        num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4, first_k_dense_replace=0,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_hidden_layers=1)),   # 21 GB a layer
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=32, num_key_value_heads=8)),
}
TINY = {"qwen3": "qwen3_moe", "deepseek": "deepseek_v3", "mixtral": "mixtral"}
VARIANTS = ("single", "ep", "ep_tutel", "ep_lancet_tokens", "ep_lancet")
LAYERS, VOCAB, SEQ = 2, 1024, 1024


def build(shape, tiny, device, dtype):
    torch.manual_seed(0)
    if tiny:
        from hf_models import causal_lm
        model = causal_lm(TINY[shape])
    else:
        import transformers as tf
        cfg_name, cls_name, kw = SHAPES[shape]
        config = getattr(tf, cfg_name)(**{"vocab_size": VOCAB, "num_hidden_layers": LAYERS,
                                          "max_position_embeddings": 8192, **kw})
        config._experts_implementation = "grouped_mm"
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype)    # built in bf16: DeepSeek-V3's layer is 46 GB in float32
        try:
            with torch.device(device):
                model = getattr(tf, cls_name)(config)
        finally:
            torch.set_default_dtype(before)
    model.config.use_cache = False
    return model.to(device=device, dtype=dtype).train()


def options(variant, mesh, backend):
    base = {"dense_backend": backend}
    if variant == "single":
        return base
    base["ep_group"] = mesh
    if variant == "ep":
        return {**base, "ep_chunks": 1, "wgrad_schedule": False}
    if variant == "ep_tutel":
        return {**base, "ep_capacity_factor": 2.0, "ep_chunks": 4, "wgrad_schedule": False}
    if variant == "ep_lancet_tokens":     # the schedule with chunks cut in tokens only (no attention in them)
        return {**base, "ep_chunk_by": "tokens"}
    return {**base, "ep_chunk_by": "auto"}   # ep_lancet: tokens or whole sequences, by the cost model


def _step(model, ids):
    out = model(ids).logits
    (out.float().square().mean()).backward()
    return out.detach()


def _timed(fn, steps, device):
    if device.type != "cuda":
        import time
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def exposed_comm(prof) -> tuple:
    """(all-to-all kernel ms, of which no compute kernel ran at the same time), summed over the
    profiled steps; None on a device without kernel events (gloo on CPUs)."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > 0]
    if not kernels:
        return None, None
    comm = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()]
    compute = sorted((e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower())
    merged = []
    for s, t in compute:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], t)
        else:
            merged.append([s, t])
    total = exposed = 0.0
    for s, t in comm:
        total += t - s
        covered = sum(max(0.0, min(t, b) - max(s, a)) for a, b in merged if a < t and b > s)
        exposed += (t - s) - covered
    return total / 1e3, exposed / 1e3


def predicted_ms():
    """The cost model's predicted time of each chunked layer (sum), from this process's compiles."""
    from moec import session
    total, found = 0.0, False
    for record in session.take():
        report = record.reports.get("chunk_tokens")
        for layer in getattr(report, "layers", ()):
            if layer.schedule is not None:
                total, found = total + layer.schedule.step_s * 1e3, True
    return total if found else None


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run_cell(shape, tokens, variant, mesh, args, device, dtype, single_out):
    from moec.runtime import shard_experts
    from moec.runtime.consistency import forget
    from torch.profiler import ProfilerActivity, profile
    torch._dynamo.reset()
    forget()
    from moec import session
    session.clear()
    model = build(shape, args.tiny, device, dtype)    # the same weights every time (seeded): no copy held
    if variant != "single":
        shard_experts(model, mesh)
    compiled = torch.compile(model, backend="moec", options=options(variant, mesh, args.dense_backend))
    rank = dist.get_rank()
    ids = torch.randint(3, model.config.vocab_size, tokens, device=device,
                        generator=torch.Generator(device=device).manual_seed(rank))

    def step():
        model.zero_grad(set_to_none=True)
        return _step(compiled, ids)
    out = step()
    row = {"shape": shape, "tokens_per_rank": tokens[0] * tokens[1], "variant": variant}
    if variant == "single":
        single_out[:] = [out, model.get_input_embeddings().weight.grad.detach().clone()]
    else:
        row["rel_err_logits"] = _rel(out, single_out[0])
        row["rel_err_embedding_grad"] = _rel(model.get_input_embeddings().weight.grad, single_out[1])
    for _ in range(args.warmup):
        step()
    dist.barrier()
    row["step_ms"] = _timed(step, args.steps, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    comm, exposed = exposed_comm(prof)
    row["a2a_ms"] = None if comm is None else comm / 3
    row["exposed_a2a_ms"] = None if exposed is None else exposed / 3
    row["predicted_layers_ms"] = predicted_ms() if variant.startswith("ep_lancet") else None
    row["moec"] = {k: v for k, v in torch._dynamo.utils.counters["moec"].items()}
    del compiled, model
    return row


def table(rows):
    fmt = lambda v, f="{:.2f}": "—" if v is None else f.format(v)
    out = ["| shape | tokens/rank | variant | step ms | all-to-all ms | exposed ms | predicted layers ms "
           "| rel err logits | rel err emb grad |", "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['tokens_per_rank']} | {r['variant']} | error: {r['error'][:120]} |||||| ")
            continue
        out.append(f"| {r['shape']} | {r['tokens_per_rank']} | {r['variant']} | {fmt(r['step_ms'])} | "
                   f"{fmt(r['a2a_ms'])} | {fmt(r['exposed_a2a_ms'])} | {fmt(r['predicted_layers_ms'])} | "
                   f"{fmt(r.get('rel_err_logits'), '{:.1e}')} | {fmt(r.get('rel_err_embedding_grad'), '{:.1e}')} |")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = sorted({(r["shape"], r["tokens_per_rank"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(cells)), 4))
    width = 0.8 / len(VARIANTS)
    for j, v in enumerate(VARIANTS):
        got = {(r["shape"], r["tokens_per_rank"]): r for r in rows if r["variant"] == v and "step_ms" in r}
        xs = [i + j * width for i, c in enumerate(cells) if c in got]
        ax.bar(xs, [got[c]["step_ms"] for c in cells if c in got], width, label=f"{v} step")
        exp = [(x, got[c]["exposed_a2a_ms"]) for x, c in zip(xs, [c for c in cells if c in got])
               if got[c]["exposed_a2a_ms"] is not None]
        if exp:
            ax.bar([x for x, _ in exp], [e for _, e in exp], width, color="black", alpha=0.35)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))], [f"{s}\n{t} tok/rank" for s, t in cells])
    ax.set_ylabel("ms per training step (dark: exposed all-to-all)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3,mixtral,deepseek")
    p.add_argument("--tokens", default="4096,16384", help="tokens per rank (batches of SEQ tokens)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cpu", action="store_true", help="gloo on CPUs")
    p.add_argument("--tiny", action="store_true", help="tiny random configs (tests/e2e/hf_models.py)")
    p.add_argument("--dense-backend", default="inductor")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, ws = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    mesh = init_device_mesh(device.type, (ws,), mesh_dim_names=("ep",))
    import transformers
    import triton
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "ranks": ws,
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "tiny": args.tiny,
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for shape in args.shapes.split(","):
        for t in [int(t) for t in args.tokens.split(",")]:
            seq = min(SEQ, t)
            tokens, single_out = (t // seq, seq), []
            for variant in args.variants.split(","):
                try:
                    row = run_cell(shape, tokens, variant, mesh, args, device, dtype, single_out)
                except Exception as e:   # one failing cell must not end the run; every rank records it
                    row = {"shape": shape, "tokens_per_rank": t, "variant": variant,
                           "error": f"{type(e).__name__}: {str(e)[:300]}"}
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
                    with open(os.path.join(args.out, "bench_ep.json"), "w") as f:
                        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if rank == 0:
        with open(os.path.join(args.out, "bench_ep.md"), "w") as f:
            f.write(f"# Expert parallelism on {ws} ranks\n\n{meta['device']}, torch {meta['torch']}, triton "
                    f"{meta['triton']}, transformers {meta['transformers']}, {meta['date']}. "
                    f"`benchmarks/bench_ep.py`{' --tiny' if args.tiny else ''}.\n\n" + table(rows) + "\n")
        try:
            plot(rows, os.path.join(args.out, "bench_ep.png"))
        except ImportError:
            pass
        print(table(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
