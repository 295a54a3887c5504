"""Where the dh kernel's time goes (Qwen3 widths, 4096 tokens): variants of its source (an epilogue part
removed each), timed alone, beside the forward gate/up kernel on the same rows. Run on a GPU:
python benchmarks/dh_ablation.py. Results: benchmarks/results/dh_ablation_h200.log."""
import importlib.util
import inspect
import os
import sys

import torch
import triton.testing

import moec.codegen  # noqa: F401
from moec.codegen import dh_kernel as base
from moec.codegen.tuning import Tile

SRC = inspect.getsource(base)
VARIANTS = {
    "baseline": [],
    "no_pre_loads": [("    u = tl.load(pre, mask=omask, other=0.0).to(tl.float32)", "    u = acc"),
                     ("        g = tl.load(pre + F, mask=omask, other=0.0).to(tl.float32)", "        g = acc")],
    "no_dw": [("    dw = tl.sum(acc * h, axis=1)", "    dw = tl.zeros((BLOCK_M,), dtype=tl.float32)")],
    "only_du_store": [("    tl.store(hw_ptr + out, (h * w).to(hw_ptr.dtype.element_ty), mask=omask)\n", ""),
                      ("        tl.store(dg_ptr + out, dg.to(dg_ptr.dtype.element_ty), mask=omask)", "        pass")],
    "no_epilogue_math": [("    dg, du = activate_backward(g, u, acc * w, alpha, limit, ACT, GATED)", "    dg, du = acc, acc")],
}


def load(name, edits):
    src = SRC.replace("from .jit_helpers", "from moec.codegen.jit_helpers")
    for old, new in edits:
        assert old in src, (name, old)
        src = src.replace(old, new)
    path = f"/tmp/dh_{name}.py"
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location(f"dh_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    E, k, H, F, T = 128, 8, 2048, 768, 4096
    dev = "cuda"
    new = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16)
    logits = torch.randn(T, E, device=dev)
    w, ids = torch.ops.moec.route(logits, None, k, "softmax", True, 1.0, 1, 1)
    offsets, src, inv = torch.ops.moec.plan(ids, E)
    S = T * k
    go, wd, pre = new(T, H), new(E, H, F) * 0.02, new(S, 2 * F)
    hw, dg, du = new(S, F), new(S, F), new(S, F)
    tiles = [Tile(64, 64, 64, 4, 4), Tile(128, 64, 64, 8, 3), Tile(128, 128, 64, 8, 3), Tile(64, 128, 64, 4, 3),
             Tile(64, 64, 64, 4, 4, 2), Tile(64, 128, 64, 4, 3, 2), Tile(128, 128, 64, 8, 3, 2)]
    flops = 2 * S * H * F
    for name, edits in VARIANTS.items():
        mod = load(name, edits)
        line = []
        for t in tiles:
            try:
                ms = triton.testing.do_bench(lambda: mod.launch_dh(go, src, offsets, k, wd, None, pre, w, 0, 0.0, 0.0, t,
                                                                   hw, dg, du), warmup=5, rep=30, return_mode="median")
                line.append(f"{tuple(t.__dict__.values())}: {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s")
            except Exception as e:
                line.append(f"{tuple(t.__dict__.values())}: {type(e).__name__}")
        print(f"{name:18s} " + " | ".join(line), flush=True)
    wd_k = wd.transpose(1, 2).contiguous().transpose(1, 2)       # same values, k (= H) contiguous
    for name in ("baseline", "no_epilogue_math"):
        mod = load(name, VARIANTS[name])
        for t in tiles[:1] + tiles[3:]:
            ms = triton.testing.do_bench(lambda: mod.launch_dh(go, src, offsets, k, wd_k, None, pre, w, 0, 0.0, 0.0, t,
                                                               hw, dg, du), warmup=5, rep=30, return_mode="median")
            print(f"{name} K-major W_down {tuple(t.__dict__.values())}: {ms:.3f} ms", flush=True)
    # the forward gate/up GEMM on the same rows, for scale (two GEMMs, activation epilogue)
    from moec.codegen.gate_up_kernel import launch_gate_up
    x, wu, wg, h = new(T, H), new(E, F, H) * 0.02, new(E, F, H) * 0.02, new(S, F)
    t = Tile(128, 64, 64, 8, 3)
    ms = triton.testing.do_bench(lambda: launch_gate_up(x, src, offsets, k, wu, wg, None, None, 0, 0.0, 0.0, t, h),
                                 warmup=5, rep=30, return_mode="median")
    print(f"gate_up fwd (2 GEMMs) {ms:.3f} ms {2 * flops / ms / 1e9:.0f} TF/s")
    ms = triton.testing.do_bench(lambda: launch_gate_up(x, src, offsets, k, wu, None, None, None, 5, 0.0, 0.0, t, h),
                                 warmup=5, rep=30, return_mode="median")
    print(f"gate_up fwd plain (1 GEMM, gathered) {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s")


if __name__ == "__main__":
    main()
