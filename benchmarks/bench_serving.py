"""Serving: prefill and decode of small multi-layer HF MoE causal LMs at real layer widths (bf16,
random weights), moec against Hugging Face's experts implementations, with and without CUDA graphs.

    python benchmarks/bench_serving.py --out DIR            # every model x variant, one process each
    python benchmarks/bench_serving.py --one qwen3 moec_cg  # a single cell, prints one JSON line

Variants (the decode step is compiled the way HF's own generate() does it: prefill uncompiled, then
a compiled forward with a static KV cache, marked static so CUDA graphs can replay it):
    hf_eager          transformers' per-expert loop, no compile
    hf_gmm_compiled   experts_implementation="grouped_mm" under torch.compile (Inductor)
    hf_gmm_cg         the same with mode="reduce-overhead" (CUDA graphs)
    moec              backend="moec" (dense partitions through Inductor)
    moec_cg           backend="moec", mode="reduce-overhead"
Per cell: prefill latency at 512 and 4096 tokens (batch 1, logits of the last token only), decode
latency per step and tokens/s at batch 1, 8 and 64, peak memory. Each model has few layers (the
widths are the real ones) and a 32k vocabulary, so the MoE layers are most of the time.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

MODELS = {
    # Qwen3-30B-A3B's decoder layer: H 2048, 128 experts of width 768, top-8, GQA 32/4 x 128
    "qwen3": dict(cls="Qwen3MoeForCausalLM", cfg="Qwen3MoeConfig", layers=4, kw=dict(
        hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        norm_topk_prob=True, decoder_sparse_step=1)),
    # Mixtral-8x7B's decoder layer: H 4096, 8 experts of width 14336, top-2, GQA 32/8
    "mixtral": dict(cls="MixtralForCausalLM", cfg="MixtralConfig", layers=2, kw=dict(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=32, num_key_value_heads=8)),
}
VARIANTS = ("hf_eager", "hf_gmm_compiled", "hf_gmm_cg", "moec", "moec_cg")
PREFILL = (512, 4096)
DECODE_BATCH = (1, 8, 64)
PROMPT, WARMUP, STEPS = 32, 4, 16


def build(name, impl):
    import transformers as tf
    spec = MODELS[name]
    config = getattr(tf, spec["cfg"])(vocab_size=32000, num_hidden_layers=spec["layers"],
                                      max_position_embeddings=8192, **spec["kw"])
    config._experts_implementation = impl
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(tf, spec["cls"])(config).to(torch.bfloat16).eval()
    return model


def _ms(fn, reps, windows=3):
    """ms per call: the best of `windows` runs of `reps` calls, so that one window holding a one-off (a CUDA graph
    recorded again, a compile) does not set the figure (stop 29's batch-8 decode: 1.60 ms for moec in one window
    of 16 steps, 1.28 from a fresh batch-8 graph in stop 32; see results/stop32_h100/)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(windows):
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def decoder(model, forward, batch, max_len, cudagraphs):
    """(step, cache): a prompt of PROMPT tokens per sequence prefilled uncompiled into a static KV
    cache; each step() then decodes one greedy token per sequence with `forward`."""
    from transformers import StaticCache
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    prompt = torch.randint(100, 30000, (batch, PROMPT), device="cuda")
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                cache_position=torch.arange(PROMPT, device="cuda"), logits_to_keep=1)
    state = {"tok": out.logits[:, -1:].argmax(-1), "pos": PROMPT}

    def step():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        pos = torch.tensor([state["pos"]], device="cuda")
        o = forward(input_ids=state["tok"], past_key_values=cache, use_cache=True, cache_position=pos,
                    position_ids=pos.expand(batch, 1), logits_to_keep=1)
        state["tok"] = o.logits[:, -1:].argmax(-1)
        state["pos"] += 1
    return step, cache


def run_cell(name, variant):
    from torch._dynamo.utils import counters
    model = build(name, "eager" if variant == "hf_eager" else os.environ.get("BENCH_EXPERTS_IMPL", "grouped_mm"))
    forward = model.forward
    if variant != "hf_eager":
        backend = "moec" if variant.startswith("moec") else "inductor"
        forward = torch.compile(model.forward, backend=backend,
                                mode="reduce-overhead" if variant.endswith("_cg") else None)
    cudagraphs = variant.endswith("_cg")
    result = {"model": name, "variant": variant, "prefill_ms": {}, "decode": {}}
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for T in PREFILL:
            ids = torch.randint(100, 30000, (1, T), device="cuda")

            def prefill():
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                return forward(input_ids=ids, use_cache=False, logits_to_keep=1).logits.argmax(-1)
            for _ in range(3):
                prefill()
            result["prefill_ms"][T] = _ms(prefill, 5)
        for B in DECODE_BATCH:
            step, cache = decoder(model, forward, B, PROMPT + WARMUP + 3 * STEPS + 8, cudagraphs)
            for _ in range(WARMUP):
                step()
            ms = _ms(step, STEPS)
            result["decode"][B] = {"ms_per_step": ms, "tokens_per_s": B * 1e3 / ms}
            del step, cache
    result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    result["moec"] = dict(counters["moec"])
    result["recompiles"] = dict(counters["stats"])
    return result


def table(rows):
    lines = ["| model | variant | prefill 512 ms | prefill 4096 ms | decode b1 ms (tok/s) | decode b8 ms (tok/s) "
             "| decode b64 ms (tok/s) | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | error: {r['error'][:80]} |||||| ")
            continue
        d = r["decode"]
        cells = [f"{d[str(b)]['ms_per_step']:.2f} ({d[str(b)]['tokens_per_s']:.0f})" for b in DECODE_BATCH]
        lines.append(f"| {r['model']} | {r['variant']} | {r['prefill_ms']['512']:.2f} | {r['prefill_ms']['4096']:.2f} | "
                     + " | ".join(cells) + f" | {r['peak_mem_gib']:.1f} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        for r in rows:
            if r["model"] == m and "decode" in r:
                ax.plot(DECODE_BATCH, [r["decode"][str(b)]["ms_per_step"] for b in DECODE_BATCH], "o-",
                        label=r["variant"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decode batch")
        ax.set_ylabel("ms per decode step")
        ax.set_title(m)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _error(stderr):
    """The exception line of a failed cell (Dynamo appends hints after it)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]:
            return ln.strip()
    return lines[-1] if lines else "?"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"))
    p.add_argument("--models", default="qwen3,mixtral")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.one:
        print("CELL " + json.dumps(run_cell(*args.one)), flush=True)
        return
    import transformers
    import triton
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for m in args.models.split(","):
        for v in args.variants.split(","):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", m, v],
                                  capture_output=True, text=True, timeout=900)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CELL ")), None)
            row = json.loads(line[5:]) if line else {"model": m, "variant": v, "error": _error(proc.stderr)}
            rows.append(json.loads(json.dumps(row)))   # int keys -> str, as read back from JSON
            print(m, v, json.dumps(row)[:400], flush=True)
            with open(os.path.join(args.out, "bench_serving_cells.json"), "w") as f:   # a cut run keeps its cells
                json.dump(rows, f, indent=1)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
            "models": {m: {k: v for k, v in MODELS[m].items()} for m in args.models.split(",")}}
    base = os.path.join(args.out, "bench_serving")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# Serving: prefill and decode\n\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                f"transformers {meta['transformers']}, {meta['date']}. Produced by benchmarks/bench_serving.py.\n\n"
                + table(rows) + "\n")
    try:
        plot(rows, base + ".png")
    except ImportError:
        pass
    print(table(rows))


if __name__ == "__main__":
    main()
