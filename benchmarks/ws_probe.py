"""Probe: does Triton's automatic warp specialization on Hopper (tl.range(..., warp_specialize=True),
Triton >= 3.5: one producer warp group issuing TMA loads, two consumer groups on wgmma) make the
grouped weight gradient faster at fine-grained widths? A minimal dW[e] = A_e^T B_e kernel whose
operands come through per-expert descriptors made on the device (their row count clipped at the
expert's end, so TMA's zero fill masks the last partial block: no pointer tail, which the Hopper
pass cannot partition around), with and without warp specialization, beside moec's tuned wgrad
kernel and torch._grouped_mm on the same ragged segments. Checked against float32.

    python benchmarks/ws_probe.py --shapes qwen3,olmoe --tokens 4096
"""
import argparse
import itertools

import torch
import triton
import triton.language as tl

from layers import SHAPES
from moec.codegen import tuning
from moec.codegen.jit_helpers import expert_mn
from moec.codegen.tuning import Tile
from moec.codegen.wgrad_kernel import launch_wgrad


@triton.jit
def ws_wgrad_kernel(a_ptr, b_ptr, offsets_ptr, out_ptr, M, N, s_o_e, s_o_m, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr):
    e, pid_m, pid_n = expert_mn(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    lo = tl.load(offsets_ptr + e).to(tl.int32)
    hi = tl.load(offsets_ptr + e + 1).to(tl.int32)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[hi, M], strides=[M, 1], block_shape=[BLOCK_K, BLOCK_M])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[hi, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N])
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in tl.range(lo, hi, BLOCK_K, warp_specialize=WS):
        acc = tl.dot(tl.trans(a_desc.load([r, m0])), b_desc.load([r, n0]), acc)
    ms = m0 + tl.arange(0, BLOCK_M)
    ns = n0 + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + e.to(tl.int64) * s_o_e + ms[:, None] * s_o_m + ns[None, :], acc.to(tl.bfloat16),
             mask=(ms[:, None] < M) & (ns[None, :] < N))


def _segments(s, T):
    logits = torch.randn(T, s.E, device="cuda")
    ids = torch.topk(logits, s.k, dim=-1).indices.flatten()
    counts = torch.bincount(ids, minlength=s.E)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ws", action="store_true", help="also the minimal kernel with and without warp specialization")
    args = ap.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for name in args.shapes.split(","):
        s = SHAPES[name]
        offsets = _segments(s, args.tokens)
        S = int(offsets[-1])
        M, N = s.F, s.H
        a = torch.randn(S, M, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(S, N, device="cuda", dtype=torch.bfloat16)
        ref = torch.stack([a[lo:hi].float().t() @ b[lo:hi].float()
                           for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
        flops = 2 * S * M * N
        out = torch.empty(s.E, M, N, device="cuda", dtype=torch.bfloat16)

        def report(label, fn):
            try:
                fn()
                err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
                print(f"  {label:44s} {ms:.3f} ms  {flops / ms * 1e-9:5.0f} TFLOP/s  rel err {err:.1e}", flush=True)
            except Exception as e:     # a probe: report and go on
                print(f"  {label:44s} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)

        print(f"{s.name} T={args.tokens}: S={S}, dW (E={s.E}, {M}, {N}), {flops * 1e-9:.0f} GFLOP")
        t = tuning.tile("wgrad", s.E, s.k, s.H, s.F, torch.bfloat16, torch.device("cuda"), args.tokens)
        report(f"moec wgrad as tuned {t}", lambda: launch_wgrad(a, b, offsets, out, t))
        for rt in (Tile(128, 128, 64, 4, 3, row_descs=True), Tile(128, 128, 64, 8, 3, row_descs=True),
                   Tile(128, 128, 32, 8, 4, row_descs=True)):
            report(f"moec wgrad_rowdesc {tuple(rt.__dict__.values())[:5]}", lambda: launch_wgrad(a, b, offsets, out, rt))
        offs32 = offsets[1:].to(torch.int32)
        report("torch._grouped_mm", lambda: out.copy_(torch._grouped_mm(a.t(), b, offs=offs32)))
        for (bm, bn, bk), ws, stages in (() if not args.ws else itertools.product(((128, 128, 64), (128, 256, 64), (128, 128, 128)),
                                                          (True, False), (3, 4))):
            grid = (s.E * triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            report(f"probe {bm}x{bn}x{bk} ws={ws} stages={stages}",
                   lambda: ws_wgrad_kernel[grid](a, b, offsets, out, M, N, out.stride(0), out.stride(1), bm, bn,
                                                 bk, ws, num_warps=4, num_stages=stages))


if __name__ == "__main__":
    main()
