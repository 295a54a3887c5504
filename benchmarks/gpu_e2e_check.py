"""End-to-end checks on a GPU that CI's CPUs cannot make: whole tiny HF MoE causal LMs compiled
with backend="moec" (Inductor around moec's Triton kernels), in bf16, against eager:

  * logits and every gradient within bf16 tolerance, and every MoE layer fused
  * a compiled training step under torch.cuda.set_sync_debug_mode("error"): no host syncs
  * decode steps under mode="reduce-overhead" (CUDA graphs) equal eager

Writes benchmarks/results/gpu_e2e_<gpu>.json (or $OUT) with device, versions and date.
Run: python gpu_e2e_check.py [train,decode_cudagraphs,decode_cudagraphs_b1,decode_default_mode] (default: all),
from outside the checkout (or with `python -P`) after `pip install -e .`, so the installed
package, not the checkout's moec/ folder, is imported.
"""
import datetime
import json
import os
import sys
import traceback

import torch
import transformers
from transformers import CompileConfig
import triton
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "e2e"))
from hf_models import causal_lm  # noqa: E402

ARCHS = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3")
# HF's batched_mm experts: eager DeepSeek-V3 generate with the grouped_mm experts hit a CUDA
# "misaligned address" at these tiny widths on the H100 (before moec ran); moec fuses both alike
IMPL = "batched_mm"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check_train(arch):
    model = causal_lm(arch, IMPL).cuda().to(torch.bfloat16).train()
    ref = causal_lm(arch, IMPL).cuda().to(torch.bfloat16).train()
    tokens = torch.randint(3, 96, (4, 64), device="cuda")
    counters.clear()
    compiled = torch.compile(model, backend="moec")
    out = compiled(tokens, labels=tokens)
    out.loss.backward()
    expected = ref(tokens, labels=tokens)
    expected.loss.backward()
    grads = [_rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None]
    # a second step with fresh tokens, now under the sync checker: no recompile, no host sync
    model.zero_grad()
    tokens2 = torch.randint(3, 96, (4, 64), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compiled(tokens2, labels=tokens2).loss.backward()
        torch.cuda.synchronize()
        sync_free = True
    except RuntimeError as e:
        sync_free = f"host sync: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"logits_rel_err": _rel(out.logits, expected.logits), "max_grad_rel_err": max(grads),
            "fused": counters["moec"]["regions_fused"], "layers": model.config.num_hidden_layers,
            "graphs": counters["moec"]["graphs"], "second_step_sync_free": sync_free}


def check_decode(arch, mode="reduce-overhead", batch=8):
    """transformers compiles the decode step itself (static cache on CUDA) with its CompileConfig.
    batch=1: each decode step one token, which takes the GEMV path on small-expert layers
    (codegen/decode_fused.py); 8 takes the grouped GEMMs."""
    model = causal_lm(arch, IMPL).cuda().to(torch.bfloat16)
    if arch == "deepseek_v3":
        # HF's eager prefill failed in cuDNN SDPA at these tiny MLA head dims on the H100, before
        # moec ran: plain attention for both the reference and the compiled decode
        model.config._attn_implementation = "eager"
    prompt = torch.randint(3, 96, (batch, 12), device="cuda")
    model.generation_config.disable_compile = True      # the eager reference
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static")
    model.generation_config.disable_compile = False
    counters.clear()
    model.generation_config.compile_config = CompileConfig(backend="moec", mode=mode)
    got = model.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static")
    return {"tokens_equal": bool(torch.equal(got, expected)),
            "tokens_agree": float((got == expected).float().mean()),
            "graphs": counters["moec"]["graphs"], "fused": counters["moec"]["regions_fused"]}


def main():
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "transformers": transformers.__version__, "date": datetime.date.today().isoformat(), "archs": {}}
    # all training checks first: a CUDA fault in one decode check poisons the context for the rest
    checks = (("train", check_train), ("decode_cudagraphs", check_decode),
              ("decode_cudagraphs_b1", lambda a: check_decode(a, batch=1)),
              ("decode_default_mode", lambda a: check_decode(a, mode="default")))
    wanted = sys.argv[1].split(",") if len(sys.argv) > 1 else [name for name, _ in checks]   # e.g. "train"
    for name, fn in [(name, fn) for name, fn in checks if name in wanted]:
        for arch in ARCHS:
            torch._dynamo.reset()
            try:
                entry = fn(arch)
            except Exception as e:
                entry = {"error": f"{type(e).__name__}: {str(e)[:600]}", "trace": traceback.format_exc()[-1500:]}
            print(arch, name, {k: v for k, v in entry.items() if k != "trace"}, flush=True)
            results["archs"].setdefault(arch, {})[name] = entry
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    gpu = results["device"].split()[1].lower() if len(results["device"].split()) > 1 else "gpu"
    with open(os.path.join(out, f"gpu_e2e_{gpu}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
