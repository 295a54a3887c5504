"""Expert-load telemetry (`expert_stats`) on a GPU, where CI's CPUs cannot look:

  * train: a tiny Qwen3-MoE causal LM compiled with Inductor around moec's Triton kernels; the
    counts of every layer equal the eager router's top-k over 5 steps, and steps 3-5 run under
    torch.cuda.set_sync_debug_mode("error") (no host syncs with expert_stats on)
  * cuda_graphs: a Mixtral block under mode="reduce-overhead", logging every call: CUDA-graph
    replays keep counting, capture is not broken by the log line
  * overhead: the training step's time with and without expert_stats (median of 30)

Prints a table and writes gpu_expert_stats_<gpu>.json to $OUT or benchmarks/results, with
device, versions and date. Run from outside the checkout (or with `python -P`) after
`pip install .`, so the installed package is imported.
"""
import copy
import datetime
import json
import logging
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import transformers
import triton
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "e2e"))
from hf_models import causal_lm, moe_block  # noqa: E402

import moec  # noqa: E402


def _topk_counts(logits, k, E):
    ids = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices
    return torch.bincount(ids.flatten(), minlength=E)


def check_train():
    torch.manual_seed(0)
    model = causal_lm("qwen3_moe", "batched_mm").cuda().train()
    ref = copy.deepcopy(model).eval()
    compiled = torch.compile(model, backend="moec", options={"expert_stats": True})
    batches = [torch.randint(3, 96, (4, 64), device="cuda") for _ in range(5)]
    for i, tokens in enumerate(batches):
        if i == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            compiled(tokens).logits.float().square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    logits = {i: [] for i in range(len(ref.model.layers))}
    for i, layer in enumerate(ref.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: logits[i].append(out[0].detach()))
    with torch.no_grad():
        for tokens in batches:
            ref(tokens)
    loads = moec.stats(compiled)
    rows = []
    for i, (name, load) in enumerate(loads.items()):
        want = sum(_topk_counts(lg, 2, 8) for lg in logits[i])
        rows.append({"layer": name, "counts": load.counts.tolist(), "eager_router": want.tolist(),
                     "differing_copies": int((load.counts - want).abs().sum()), "steps": int(load.steps),
                     "imbalance": float(load.imbalance)})
    ok = len(rows) == 2 and all(r["differing_copies"] == 0 and r["steps"] == 5 for r in rows)
    return {"ok": ok, "sync_free_steps": 3, "layers": rows}


def check_cuda_graphs():
    torch.manual_seed(0)
    block = moe_block("mixtral", "batched_mm").cuda()
    os.environ.update(MOEC_EXPERT_STATS="1", MOEC_EXPERT_STATS_LOG_EVERY="1")   # mode= excludes options=
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("moec")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        compiled = torch.compile(block, backend="moec", mode="reduce-overhead")
        xs = [torch.randn(2, 16, 32, device="cuda") for _ in range(8)]
        worst = 0.0
        with torch.no_grad():
            for x in xs:
                out = compiled(x).clone()
                worst = max(worst, (out - block(x)).abs().max().item())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        for key in ("MOEC_EXPERT_STATS", "MOEC_EXPERT_STATS_LOG_EVERY"):
            os.environ.pop(key)
    want = sum(_topk_counts(F.linear(x.reshape(-1, 32), block.gate.weight), 2, 4) for x in xs)
    [load] = moec.stats(compiled).values()
    logged = [line for line in lines if line.startswith("expert load")]
    return {"ok": load.counts.tolist() == want.tolist() and int(load.steps) == len(xs) and worst < 1e-4,
            "counts": load.counts.tolist(), "eager_router": want.tolist(), "steps": int(load.steps),
            "calls": len(xs), "log_lines": len(logged), "max_abs_diff_vs_eager": worst,
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def _step_ms(expert_stats, tokens, repeats=30):
    torch.manual_seed(0)
    model = causal_lm("qwen3_moe", "batched_mm").cuda().train()
    compiled = torch.compile(model, backend="moec", options={"expert_stats": expert_stats})
    times = []
    for i in range(repeats + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        compiled(tokens).logits.float().square().mean().backward()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def check_overhead():
    tokens = torch.randint(3, 96, (8, 512), device="cuda")
    off, on = _step_ms(False, tokens), _step_ms(True, tokens)
    return {"ok": True, "tokens": tokens.numel(), "step_ms_off": off, "step_ms_on": on}


def main():
    results = {}
    for name, fn in (("train", check_train), ("cuda_graphs", check_cuda_graphs), ("overhead", check_overhead)):
        torch._dynamo.reset()
        counters.clear()
        try:
            results[name] = fn()
        except Exception as e:
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                             "trace": traceback.format_exc()[-3000:]}
        print(f"{name:12s} {'ok' if results[name]['ok'] else 'FAILED'}  "
              f"{json.dumps({k: v for k, v in results[name].items() if k not in ('trace', 'layers')})[:600]}")
    gpu = torch.cuda.get_device_name()
    record = {"device": gpu, "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
              "results": results}
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    path = os.path.join(folder, f"gpu_expert_stats_{gpu.lower().replace(' ', '_')}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print("wrote", path)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
