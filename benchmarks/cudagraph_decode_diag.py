"""Decode under CUDA graphs on a GPU, one variant per process: argv arch way [mode].

way = "hf": transformers' own decode compile, generation_config.compile_config = CompileConfig(backend="moec")
      (with a static cache on CUDA, generate() compiles the decode step itself; prefill runs eager)
way = "forward": model.forward = torch.compile(..., backend="moec") with generation_config.disable_compile
"""
import os
import sys
import traceback

import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
from hf_models import causal_lm  # noqa: E402

arch, way = sys.argv[1], sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else "reduce-overhead"
model = causal_lm(arch, "batched_mm").cuda().to(torch.bfloat16)
prompt = torch.randint(3, 96, (8, 12), device="cuda")
model.generation_config.disable_compile = True
expected = model.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static")
if way == "hf":
    model.generation_config.disable_compile = False
    model.generation_config.compile_config = CompileConfig(backend="moec", mode=mode, fullgraph=False)
else:
    model.forward = torch.compile(model.forward, backend="moec", mode=None if mode == "none" else mode)
try:
    got = model.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static")
    again = model.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static")
    print("RESULT", arch, way, mode, "equal", torch.equal(got, expected), torch.equal(again, expected),
          float((got == expected).float().mean()), dict(counters["moec"]), dict(counters["inductor"]).get("cudagraph_skips"),
          "graphs", counters["stats"].get("unique_graphs"))
except Exception:
    print("RESULT", arch, way, mode, "FAILED")
    traceback.print_exc()
