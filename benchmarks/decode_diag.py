"""Why a decode step costs what it costs: one model, one batch, moec vs HF grouped_mm, under CUDA
graphs (mode="reduce-overhead") or not. Prints ms per step, the CUDA-graph and recompile counters,
moec's `cudagraphs.txt` report (MOEC_DUMP must point at a folder), the per-kernel CUDA time
and CPU time of 5 steps from torch.profiler, and the routing of such a step (run eagerly after: distinct experts
and the most rows on one expert, per layer), which sets the bytes a step must read.

    MOEC_DUMP=/tmp/d python benchmarks/decode_diag.py qwen3 moec_cg 1
    python benchmarks/decode_diag.py qwen3 moec_cg 8 --after 1   # as bench_serving: batch 1 first, so batch 8
                                                                 # runs the graph Dynamo compiles for any batch
"""
import argparse
import glob
import os
import sys

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import PROMPT, _ms, build, decoder  # noqa: E402


def main(name, variant, batch, after=None):
    model = build(name, "grouped_mm")
    cg = variant.endswith("_cg")
    forward = torch.compile(model.forward, backend="moec" if variant.startswith("moec") else "inductor",
                            mode="reduce-overhead" if cg else None)
    with torch.inference_mode():
        if after is not None:
            first, _cache = decoder(model, forward, after, PROMPT + 64, cg)
            for _ in range(3):
                first()
        step, _cache = decoder(model, forward, batch, PROMPT + 64, cg)
        for _ in range(6):
            step()
        ms = _ms(step, 10)
        print(f"RESULT {name} {variant} b{batch}: {ms:.3f} ms/step", flush=True)
        print("counters moec", dict(counters["moec"]), "inductor skips",
              {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}, "stats", dict(counters["stats"]))
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=70))
    layers = routing(model, batch)
    c = model.config
    F = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    mb = sum(n for n, _ in layers) * 3 * c.hidden_size * F * 2 / 1e6       # gate, up, down of each expert hit, bf16
    print("routing (distinct experts, most rows on one) per layer", layers, f"-> {mb:.0f} MB of expert weights a step")
    for path in sorted(glob.glob(os.path.join(os.environ.get("MOEC_DUMP", "/nonexistent"), "**", "cudagraphs.txt"),
                                 recursive=True)):
        print("==", path)
        print(open(path).read()[:3000])


def routing(model, batch):
    """Per MoE layer (distinct experts, most rows on one expert) in the 7th greedy decode step, eagerly: greedy
    decoding with random weights can repeat one token, which concentrates the routing."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[2].flatten()))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    with torch.inference_mode():
        step, _cache = decoder(model, model.forward, batch, PROMPT + 64, False)
        for _ in range(7):
            seen.clear()
            step()
    for h in hooks:
        h.remove()
    counts = [torch.bincount(ids).cpu() for ids in seen]
    return [(int((c > 0).sum()), int(c.max())) for c in counts]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("variant")
    ap.add_argument("batch", type=int)
    ap.add_argument("--after", type=int, help="decode this batch first (a second batch recompiles for any batch)")
    args = ap.parse_args()
    main(args.model, args.variant, args.batch, args.after)
