"""Where the training backward loses to the forward (Qwen3 / OLMoE widths, 4096 tokens), on one GPU:
the dh kernel over a few tiles, and the weight-gradient kernel as shipped and in variants of its
source (A read K-major and transposed in registers; the store cut to one element per tile, which
prices the epilogue), each with x gathered by token in the kernel and pre-gathered, beside
torch._grouped_mm (CUTLASS) on the same GEMMs with gathered copies made beforehand, as the bar.
Run: python benchmarks/bwd_ablation.py [--shapes qwen3,olmoe]. Results: results/bwd_ablation_h200.log."""
import argparse
import importlib.util
import inspect

import torch
import triton
import triton.testing

import moec.codegen  # noqa: F401
from moec.codegen import dh_kernel as dh_base
from moec.codegen import wgrad_kernel as wgrad_base
from moec.codegen.tuning import Tile, tile as tuned_tile

SHAPES = {"qwen3": (128, 8, 2048, 768), "olmoe": (64, 8, 2048, 1024)}

WGRAD_VARIANTS = {
    "shipped": [],
    "a_trans": [("        a = tl.load(a_ptr + arow[None, :] * s_a + ms[:, None], mask=amask, other=0.0)   # (BM, BK)",
                 "        a = tl.trans(tl.load(a_ptr + arow[:, None] * s_a + ms[None, :],\n"
                 "                             mask=smask[:, None] & mmask[None, :], other=0.0))")],
    "no_store": [("        ptrs = base + ms64[:, None] * s_m + ns64[None, :] * s_n\n"
                  "        tl.store(ptrs, acc.to(base.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])",
                  "        tl.store(base + tl.min(ms64, axis=0) * s_m, tl.sum(tl.sum(acc, axis=1), axis=0)"
                  ".to(base.dtype.element_ty))")],
}


def load_variant(name, edits):
    src = inspect.getsource(wgrad_base).replace("from .jit_helpers", "from moec.codegen.jit_helpers")
    for old, new in edits:
        assert old in src, (name, old)
        src = src.replace(old, new)
    path = f"/tmp/wgrad_{name}.py"
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"wgrad_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def row(label, ms, flops):
    print(f"  {label:70s} {ms:7.3f} ms {flops / ms / 1e9:5.0f} TF/s", flush=True)


def run(shape):
    E, k, H, F = SHAPES[shape]
    T, dev = 4096, "cuda"
    S = T * k
    new = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16)
    w, ids = torch.ops.moec.route(torch.randn(T, E, device=dev), None, k, "softmax", True, 1.0, 1, 1)
    offsets, src, inv = torch.ops.moec.plan(ids, E)
    go, wd, pre = new(T, H), new(E, H, F) * 0.02, new(S, 2 * F)
    hw, dg, du, x = new(S, F), new(S, F), new(S, F), new(T, H)
    gemm = 2 * S * H * F
    print(f"\n{shape}: E{E} k{k} H{H} F{F} T{T} (one GEMM = {gemm / 1e9:.0f} GFLOP)", flush=True)
    tuned = tuned_tile("dh", E, k, H, F, torch.bfloat16, x.device, T)
    for t in [tuned, Tile(64, 128, 64, 4, 3), Tile(128, 128, 64, 8, 3), Tile(128, 128, 64, 8, 4),
              Tile(128, 256, 64, 8, 3), Tile(128, 128, 64, 8, 5)]:
        try:
            ms = bench(lambda: dh_base.launch_dh(go, src, offsets, k, wd, None, pre, w, 0, 0.0, 0.0, t, hw, dg, du))
            row(f"dh {tuple(t.__dict__.values())}", ms, gemm)
        except Exception as err:     # a tile that does not fit this GPU's shared memory
            print(f"  dh {tuple(t.__dict__.values())}: {type(err).__name__}", flush=True)
    outu = new(E, F, H)
    xg = x[src // k]
    tiles = [tuned_tile("wgrad", E, k, H, F, torch.bfloat16, x.device, T), Tile(128, 128, 64, 8, 3),
             Tile(128, 128, 32, 8, 4), Tile(128, 256, 64, 8, 3), Tile(128, 128, 128, 8, 2), Tile(128, 256, 128, 8, 2),
             Tile(256, 128, 64, 8, 3)]
    for name, edits in WGRAD_VARIANTS.items():
        mod = load_variant(name, edits)
        for t in tiles:
            for gathered in (True, False):
                label = f"wgrad {name} {'x gathered in-kernel' if gathered else 'x pre-gathered'} " \
                        f"{tuple(t.__dict__.values())}"
                try:
                    fn = (lambda: mod.launch_wgrad(du, x, offsets, outu, t, src=src, k=k)) if gathered else \
                        (lambda: mod.launch_wgrad(du, xg, offsets, outu, t))
                    row(label, bench(fn), gemm)
                except Exception as err:
                    print(f"  {label}: {type(err).__name__}: {str(err)[:200]}", flush=True)
    offs = offsets[1:E + 1].to(torch.int32)
    gog = go[src // k]
    try:
        wdt = wd.transpose(1, 2).contiguous().transpose(1, 2)
        row("grouped_mm dh GEMM (grad_out gathered @ W_down)", bench(lambda: torch._grouped_mm(gog, wdt, offs=offs)),
            gemm)
        row("grouped_mm wgrad GEMM (du^T @ x gathered)", bench(lambda: torch._grouped_mm(du.t(), xg, offs=offs)), gemm)
    except Exception as err:
        print(f"  grouped_mm: {type(err).__name__}: {str(err)[:300]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3,olmoe")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for shape in args.shapes.split(","):
        run(shape)


if __name__ == "__main__":
    main()
