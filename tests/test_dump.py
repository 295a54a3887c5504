"""Pass debugging dumps: written, parseable, re-runnable, pictured, and diffable; TORCH_LOGS
and TORCH_TRACE carry the decisions."""
import json
import os
import subprocess
import sys
import time

import torch

import moec
from moec.dump_diff import compare
from e2e.hf_models import causal_lm
from moe_idioms import MaskLoopMoE

PNG = b"\x89PNG\r\n\x1a\n"


def _compile_and_run(model, tokens, dump_dir, dense_backend="aot_eager"):
    compiled = torch.compile(model, backend="moec", options={"dump_dir": str(dump_dir), "dense_backend": dense_backend})
    out = compiled(tokens)
    getattr(out, "logits", out).sum().backward()
    [folder] = [os.path.join(dump_dir, d) for d in os.listdir(dump_dir)]
    return folder


def test_dump_folder_complete_and_graphs_rerun(tmp_path):
    model = causal_lm("qwen3_moe", "eager")
    tokens = torch.randint(3, 96, (2, 7))
    start = time.perf_counter()
    folder = _compile_and_run(model, tokens, tmp_path)
    assert time.perf_counter() - start < 60
    files = set(os.listdir(folder))
    assert {"index.md", "00_input.py", "01_detect.py", "02_rewrite.py", "regions.json", "regions.md",
            "kernels.json", "region_0.png", "region_1.png", "aot_forward.py", "aot_backward.py"} <= files
    index = open(os.path.join(folder, "index.md")).read()
    assert all(f"[{name}]" in index for name in files - {"index.md"})
    kernels = json.load(open(os.path.join(folder, "kernels.json")))
    assert [k["module"] for k in kernels] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(set(k) >= {"implementation", "tiles", "switches"} for k in kernels)
    regions = json.load(open(os.path.join(folder, "regions.json")))
    assert [(r["module"], r["status"], r["router"]["kind"]) for r in regions] == \
        [("model.layers.0.mlp", "fused", "softmax_topk"), ("model.layers.1.mlp", "fused", "softmax_topk")]
    for png in ("region_0.png", "region_1.png"):
        assert open(os.path.join(folder, png), "rb").read(8) == PNG



def test_dumped_graphs_rerun_and_match(tmp_path):
    """Every numbered graph re-runs on the graph's inputs and gives the input graph's result."""
    model = causal_lm("deepseek_v3", "grouped_mm")
    tokens = torch.randint(3, 96, (2, 7))
    given = []

    def recording(gm, inputs):   # the graph's real inputs, for re-running the dumped graphs
        given.append(inputs)
        return moec.moec_backend(gm, inputs, options={"dump_dir": str(tmp_path), "dense_backend": "eager"})
    torch.compile(model, backend=recording)(tokens)
    [folder] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    results = {}
    for name in sorted(f for f in os.listdir(folder) if f[:2].isdigit()):
        namespace = {}
        exec(open(os.path.join(folder, name)).read(), namespace)
        with torch.no_grad():
            results[name] = namespace["Graph"]()(*given[0])[0]
    reference = results.pop("00_input.py")
    assert set(results) == {"01_detect.py", "02_rewrite.py", "03_expert_stats.py", "04_expert_parallel.py",
                            "05_chunk_tokens.py", "06_fuse_combine.py", "07_fuse_routing.py",
                            "08_fuse_router.py"}
    for name, value in results.items():
        torch.testing.assert_close(value, reference, rtol=2e-4, atol=2e-5, msg=name)
    assert "torch.ops.moec.route" in open(os.path.join(folder, "02_rewrite.py")).read()


def test_missed_region_reason_in_dump(tmp_path):
    """A tanh-gated expert is no activation moec knows: a near miss, with the reason."""
    torch.manual_seed(0)
    folder = _compile_and_run(MaskLoopMoE(act="tanh").double(), torch.randn(12, 32, dtype=torch.float64),
                              tmp_path, dense_backend="eager")
    [row] = json.load(open(os.path.join(folder, "regions.json")))
    assert row["status"] == "missed" and "no known expert form reproduces the layer" in row["reason"]
    assert "no known expert form" in open(os.path.join(folder, "regions.md")).read()


def test_diff_names_the_changed_region(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    model = causal_lm("mixtral", "batched_mm")
    tokens = torch.randint(3, 96, (2, 5))
    fa = _compile_and_run(model, tokens, a)
    torch._dynamo.reset()
    os.environ["MOEC_MAX_REWRITES"] = "1"
    try:
        fb = _compile_and_run(model, tokens, b)
    finally:
        del os.environ["MOEC_MAX_REWRITES"]
    assert compare(fa, fa) == []
    lines = compare(fa, fb)
    assert any(l.startswith("region model.layers.1.mlp: fused") for l in lines), lines
    assert any("02_rewrite.py differs" in l for l in lines)
    cli = subprocess.run([sys.executable, "-m", "moec.dump", "diff", str(a), str(b)], capture_output=True, text=True)
    assert cli.returncode == 1 and "model.layers.1.mlp" in cli.stdout


_SCRIPT = """
import torch, sys
sys.path.insert(0, {tests!r})
from moe_idioms import MaskLoopMoE
torch.manual_seed(0)
torch.compile(MaskLoopMoE(), backend="moec", options={{"dense_backend": "eager"}})(torch.randn(8, 32))
"""


def test_torch_logs_and_trace(tmp_path):
    tests = os.path.dirname(__file__)
    env = dict(os.environ, TORCH_LOGS="moec", TORCH_TRACE=str(tmp_path / "trace"))
    run = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "region <root>: fused (softmax_topk, E=4, k=2, expert_loop" in run.stderr
    traces = "".join(open(os.path.join(tmp_path / "trace", f)).read() for f in os.listdir(tmp_path / "trace"))
    for artifact in ("moec_input_graph", "moec_after_rewrite", "moec_regions"):
        assert f'"name": "{artifact}"' in traces


def test_dump_says_whether_cuda_graphs_capture(tmp_path, monkeypatch):
    # mode= and options= are exclusive in torch.compile: the dump folder comes from MOEC_DUMP
    monkeypatch.setenv("MOEC_DUMP", str(tmp_path))
    from torch._dynamo.utils import counters
    counters.clear()
    model = causal_lm("qwen3_moe", "grouped_mm")
    tokens = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        got = torch.compile(model, backend="moec", mode="reduce-overhead")(tokens).logits
        expected = model(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    [folder] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    text = open(os.path.join(folder, "cudagraphs.txt")).read()
    # a CPU graph cannot be captured: Inductor's own reason is passed on, and the index lists the file
    assert text.startswith("forward: CUDA graphs off: skipping cudagraphs due to"), text
    assert "[cudagraphs.txt]" in open(os.path.join(folder, "index.md")).read()
    assert counters["moec"]["cudagraphs_off"] == 1 and counters["moec"]["regions_fused"] == 2


def test_dump_pictures_regions_inside_checkpoint_bodies(tmp_path):
    model = causal_lm("qwen3_moe", "grouped_mm").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokens = torch.randint(3, 96, (2, 7))
    torch.compile(model, backend="moec", options={"dump_dir": str(tmp_path), "dense_backend": "eager"})(
        tokens, labels=tokens).loss.backward()
    pictures = [os.path.join(tmp_path, d, f) for d in os.listdir(tmp_path)
                for f in os.listdir(os.path.join(tmp_path, d)) if f.startswith("region_")]
    assert len(pictures) == 2
    for path in pictures:
        with open(path, "rb") as f:
            assert f.read(8) == PNG
