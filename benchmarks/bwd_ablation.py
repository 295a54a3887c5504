"""Where the training backward loses to the forward (Qwen3 / OLMoE widths, 4096 tokens), and what
would win it back. Times, on one GPU, alone: the dh kernel as shipped and with its epilogue's
pre-activation loads issued before the K loop (their latency then hides under the MMAs); the
weight-gradient kernel as shipped and as a persistent kernel (one program per SM walking the
tiles, optionally with the tile loop flattened into the K loop so the next tile's loads overlap
this tile's store); and torch._grouped_mm (CUTLASS) on the same GEMMs, gathered copies made
beforehand, as the bar. Run: python benchmarks/bwd_ablation.py [--shapes qwen3,olmoe]."""
import argparse
import importlib.util
import inspect

import torch
import triton
import triton.language as tl
import triton.testing

import moec.codegen  # noqa: F401
from moec.codegen import dh_kernel as dh_base
from moec.codegen.jit_helpers import mma
from moec.codegen.tuning import Tile, tile as tuned_tile

SHAPES = {"qwen3": (128, 8, 2048, 768), "olmoe": (64, 8, 2048, 1024)}

EARLY_PRE = [
    ("    cmask = cols < F\n",
     "    cmask = cols < F\n"
     "    omask0 = rmask[:, None] & cmask[None, :]\n"
     "    pre0 = pre_ptr + rows64[:, None] * s_pre + cols[None, :]\n"
     "    u0 = tl.load(pre0, mask=omask0, other=0.0)\n"
     "    g0 = u0\n"
     "    if GATED:\n"
     "        g0 = tl.load(pre0 + F, mask=omask0, other=0.0)\n"),
    ("        dw = _epilogue(acc, cols, rows64, rmask, w, pre_ptr,",
     "        dw = _epilogue_pre(acc, u0, g0, cols, rows64, rmask, w, pre_ptr,"),
]
EPILOGUE_PRE = '''

@triton.jit
def _epilogue_pre(acc, u, g, cols, rows64, rmask, w, pre_ptr, hw_ptr, dg_ptr, du_ptr, F, alpha, limit, s_pre,
                  ACT: tl.constexpr, GATED: tl.constexpr):
    omask = rmask[:, None] & (cols < F)[None, :]
    u = u.to(tl.float32)
    g = g.to(tl.float32)
    h = tl.where(omask, activate(g, u, alpha, limit, ACT, GATED), 0.0)
    out = rows64[:, None] * F + cols[None, :]
    tl.store(hw_ptr + out, (h * w).to(hw_ptr.dtype.element_ty), mask=omask)
    dw = tl.sum(acc * h, axis=1)
    dg, du = activate_backward(g, u, acc * w, alpha, limit, ACT, GATED)
    tl.store(du_ptr + out, du.to(du_ptr.dtype.element_ty), mask=omask)
    if GATED:
        tl.store(dg_ptr + out, dg.to(dg_ptr.dtype.element_ty), mask=omask)
    return dw
'''


def load_variant(name, edits, extra=""):
    src = inspect.getsource(dh_base).replace("from .jit_helpers", "from moec.codegen.jit_helpers")
    for old, new in edits:
        assert old in src, (name, old)
        src = src.replace(old, new)
    path = f"/tmp/dh_{name}.py"
    with open(path, "w") as f:
        f.write(src + extra)
    spec = importlib.util.spec_from_file_location(f"dh_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@triton.jit
def wgrad_persistent(a_ptr, a2_ptr, b_ptr, src_ptr, offsets_ptr, out_ptr, out2_ptr, E, M, N, k_top, s_a, s_b,
                     s_o_e, s_o_m, NUM_PROGS, GATHER: tl.constexpr, DUAL: tl.constexpr, FLATTEN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_e = n_m * n_n
    for t in tl.range(tl.program_id(0), E * per_e, NUM_PROGS, flatten=FLATTEN):
        e = t // per_e
        pid_m = (t // n_n) % n_m
        pid_n = t % n_n
        lo = tl.load(offsets_ptr + e)
        hi = tl.load(offsets_ptr + e + 1)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = ms < M, ns < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s0 in range(lo, hi, BLOCK_K):
            s = s0 + tl.arange(0, BLOCK_K)
            smask = s < hi
            s64 = s.to(tl.int64)
            brow = s64
            if GATHER:
                brow = (tl.load(src_ptr + s, mask=smask, other=0) // k_top).to(tl.int64)
            b = tl.load(b_ptr + brow[:, None] * s_b + ns[None, :], mask=smask[:, None] & nmask[None, :], other=0.0)
            amask = mmask[:, None] & smask[None, :]
            a = tl.load(a_ptr + s64[None, :] * s_a + ms[:, None], mask=amask, other=0.0)
            acc = mma(a, b, acc, False)
            if DUAL:
                a = tl.load(a2_ptr + s64[None, :] * s_a + ms[:, None], mask=amask, other=0.0)
                acc2 = mma(a, b, acc2, False)
        o = e.to(tl.int64) * s_o_e + ms.to(tl.int64)[:, None] * s_o_m + ns[None, :]
        omask = mmask[:, None] & nmask[None, :]
        tl.store(out_ptr + o, acc.to(out_ptr.dtype.element_ty), mask=omask)
        if DUAL:
            tl.store(out2_ptr + o, acc2.to(out2_ptr.dtype.element_ty), mask=omask)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def row(label, ms, flops):
    print(f"  {label:58s} {ms:7.3f} ms {flops / ms / 1e9:5.0f} TF/s", flush=True)


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
    tiles = [tuned, Tile(64, 128, 64, 4, 3), Tile(128, 64, 64, 8, 3), Tile(128, 128, 64, 8, 3),
             Tile(128, 128, 64, 8, 4)]
    early = load_variant("early_pre", EARLY_PRE, EPILOGUE_PRE)
    for name, mod in (("dh shipped", dh_base), ("dh early pre loads", early)):
        for t in tiles:
            try:
                ms = bench(lambda: mod.launch_dh(go, src, offsets, k, wd, None, pre, w, 0, 0.0, 0.0, t, hw, dg, du))
                row(f"{name} {tuple(t.__dict__.values())}", ms, gemm)
            except Exception as err:     # a tile that does not fit this GPU's shared memory
                print(f"  {name} {tuple(t.__dict__.values())}: {type(err).__name__}", flush=True)
    # weight gradients: dW_up, dW_gate (dual, x gathered by token) and one plain GEMM
    from moec.codegen.wgrad_kernel import launch_wgrad
    outu, outg = new(E, F, H), new(E, F, H)
    t_dual = tuned_tile("wgrad_dual", E, k, H, F, torch.bfloat16, x.device, T)
    t_one = tuned_tile("wgrad", E, k, H, F, torch.bfloat16, x.device, T)
    row(f"wgrad dual shipped {tuple(t_dual.__dict__.values())}",
        bench(lambda: launch_wgrad(du, x, offsets, outu, t_dual, src=src, k=k, a2=dg, out2=outg)), 2 * gemm)
    row(f"wgrad single shipped {tuple(t_one.__dict__.values())}",
        bench(lambda: launch_wgrad(du, x, offsets, outu, t_one, src=src, k=k)), gemm)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for t in (Tile(128, 128, 64, 8, 3), Tile(128, 64, 32, 8, 3), Tile(128, 256, 64, 8, 3), Tile(64, 128, 64, 4, 3)):
        for dual in (False, True):
            for flatten in (False, True):
                for progs in (sms, 2 * sms):
                    label = f"wgrad persistent {'dual' if dual else 'single'} flatten={flatten} progs={progs} " \
                            f"{(t.block_m, t.block_n, t.block_k, t.num_warps, t.num_stages)}"
                    try:
                        fn = lambda: wgrad_persistent[(progs,)](
                            du, dg, x, src, offsets, outu, outg, E, F, H, k, du.stride(0), x.stride(0),
                            outu.stride(0), outu.stride(1), progs, GATHER=True, DUAL=dual, FLATTEN=flatten,
                            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps,
                            num_stages=t.num_stages)
                        row(label, bench(fn), gemm * (2 if dual else 1))
                    except Exception as err:
                        print(f"  {label}: {type(err).__name__}: {str(err)[:200]}", flush=True)
    ref = torch.empty_like(outu)
    launch_wgrad(du, x, offsets, ref, t_one, src=src, k=k)
    wgrad_persistent[(sms,)](du, dg, x, src, offsets, outu, outg, E, F, H, k, du.stride(0), x.stride(0),
                             outu.stride(0), outu.stride(1), sms, GATHER=True, DUAL=False, FLATTEN=True,
                             BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    print(f"  persistent flatten vs shipped max |diff| {(outu.float() - ref.float()).abs().max().item():.3e}")
    # the bar: CUTLASS grouped GEMMs on gathered copies
    offs = offsets[1:E + 1].to(torch.int32)
    xg, gog = x[src // k], go[src // k]
    try:
        wdt = wd.transpose(1, 2).contiguous().transpose(1, 2)
        row("grouped_mm dh GEMM (grad_out gathered @ W_down)", bench(lambda: torch._grouped_mm(gog, wdt, offs=offs)),
            gemm)
        row("grouped_mm wgrad GEMM (du^T @ x gathered)", bench(lambda: torch._grouped_mm(du.t(), xg, offs=offs)), gemm)
        row("grouped_mm dx GEMM (du @ W_up)", bench(lambda: torch._grouped_mm(du, outu.transpose(1, 2).contiguous()
                                                                                .transpose(1, 2), offs=offs)), gemm)
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
