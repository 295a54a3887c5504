"""Token-count buckets under real CUDA graphs (mode="reduce-overhead"): a norm -> MoE -> residual
block of each Hugging Face architecture, served at token counts that change every call. Counts the
CUDA graph recordings with buckets ("auto", the default under CUDA graphs) and without ("off"),
checks every output against eager, and times a replay per count.

    python benchmarks/bucket_graphs_check.py --out benchmarks/results/bucket_graphs_h100.json
"""
import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn as nn
import triton
from torch._dynamo.utils import counters
from torch._inductor import cudagraph_trees

import moec  # noqa: F401  (registers the backend)
from moec import session

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
from hf_models import ARCHS, moe_block  # noqa: E402


class Block(nn.Module):
    def __init__(self, moe, hidden):
        super().__init__()
        self.norm, self.moe = nn.RMSNorm(hidden), moe

    def forward(self, x):
        y = self.moe(self.norm(x))
        return x + (y[0] if isinstance(y, tuple) else y)      # GPT-OSS's MLP also returns its router scores


def recordings():
    """Counter of CUDA graph recordings (cudagraph trees record a new graph per unseen shape)."""
    seen = {"n": 0}
    real = cudagraph_trees.CUDAGraphTreeManager.record_function

    def spy(self, *args, **kwargs):
        seen["n"] += 1
        return real(self, *args, **kwargs)
    cudagraph_trees.CUDAGraphTreeManager.record_function = spy
    return seen


def serve(arch, impl, counts, buckets, device, mode, rec):
    torch.manual_seed(0)
    hidden = ARCHS[arch][0]().hidden_size
    block = Block(moe_block(arch, impl), hidden).to(device)
    ref = Block(moe_block(arch, "eager"), hidden).to(device, torch.float64)   # same seed: same weights
    block = block.to(torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    session.take()
    os.environ["MOEC_TOKEN_BUCKETS"] = buckets        # torch.compile takes mode or options, not both
    compiled = torch.compile(block, backend="moec", mode=mode)
    before, worst, times = rec["n"], 0.0, {}
    with torch.no_grad():
        for T in counts:
            x = torch.randn(T, 1, hidden, device=device, dtype=torch.bfloat16)
            for _ in range(3):                       # cudagraph trees record on the second or third call
                got = compiled(x)
            want = ref(x.double())
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            worst = max(worst, err)
            if device == "cuda":
                times[T] = triton.testing.do_bench(lambda: compiled(x), warmup=5, rep=30, return_mode="median")
    whys = [r.reports["token_buckets"].why for r in session.take() if "token_buckets" in r.reports]
    return {"why_not": [w for w in whys if w], "recordings": rec["n"] - before,
            "bucketed_graphs": counters["moec"]["token_buckets"], "graphs": counters["moec"]["graphs"],
            "max_rel_err": worst, "ms": times}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="qwen3_moe,mixtral,gpt_oss")
    ap.add_argument("--impl", default="grouped_mm")
    ap.add_argument("--counts", default="5,6,7,8,9,11,13,16")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mode = "reduce-overhead" if device == "cuda" else None
    rec = recordings()
    counts = [int(c) for c in args.counts.split(",")]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "counts": counts, "runs": {}}
    for arch in args.archs.split(","):
        for buckets in ("auto", "off") if device == "cuda" else ("always", "off"):
            r = serve(arch, args.impl, counts, buckets, device, mode, rec)
            result["runs"][f"{arch}/{buckets}"] = r
            print(f"{arch} token_buckets={buckets}: {r['recordings']} CUDA graph recordings over {len(counts)} "
                  f"counts, {r['bucketed_graphs']}/{r['graphs']} graphs bucketed, max rel err "
                  f"{r['max_rel_err']:.2e}, not bucketed: {r['why_not']}, ms per call "
                  + ", ".join(f"T={t}: {m:.3f}" for t, m in r["ms"].items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(result))


def markdown(result) -> str:
    lines = [f"device: {result['device']}; torch {result['torch']}; triton {result['triton']}; {result['date']}", "",
             "| block | token_buckets | CUDA graph recordings | graphs bucketed | max rel. err vs float64 | "
             "not bucketed because |", "|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        arch, buckets = name.split("/")
        lines.append(f"| {arch} | {buckets} | {r['recordings']} over {len(result['counts'])} counts | "
                     f"{r['bucketed_graphs']} of {r['graphs']} | {r['max_rel_err']:.1e} | "
                     f"{'; '.join(r.get('why_not', [])) or '—'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
