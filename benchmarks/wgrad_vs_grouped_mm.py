"""What CUTLASS's grouped GEMM (`torch._grouped_mm`, HF grouped_mm's backward) would save in moec's
weight gradients: moec's two launches (dW_up | dW_gate from du, dg against x gathered by token;
dW_down from grad_out gathered by token against w h) at the shipped tiles, against
`torch._grouped_mm` on the same operands: K-grouped (2-D x 2-D with offsets), [du | dg] as one
(S, 2F) operand so the dual gradient is one GEMM, the gathered copy made the same way for both
(outside the timing of neither: both include it). Values checked against each other. bf16.

Run: python benchmarks/wgrad_vs_grouped_mm.py [--shapes qwen3,olmoe,gptoss,mixtral] [--tokens 4096,8192]
"""
import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from layers import SHAPES  # noqa: E402
from moec.codegen import tuning  # noqa: E402
from moec.codegen.gather_kernel import gather_rows  # noqa: E402
from moec.codegen.wgrad_kernel import launch_wgrad  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe,gptoss,mixtral")
    ap.add_argument("--tokens", default="4096,8192")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| layer | tokens | TFLOP dual / down | moec dual ms (TFLOP/s) | grouped_mm dual ms (TFLOP/s) | "
          "moec down ms (TFLOP/s) | grouped_mm down ms (TFLOP/s) | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    dev, bf = "cuda", torch.bfloat16
    for name in args.shapes.split(","):
        s = SHAPES[name]
        for T in map(int, args.tokens.split(",")):
            S = T * s.k
            offsets, src, _ = torch.ops.moec.plan(torch.randn(T, s.E, device=dev).topk(s.k, dim=1).indices, s.E)
            offs = offsets[1:].to(torch.int32)
            x, go = torch.randn(T, s.H, device=dev, dtype=bf), torch.randn(T, s.H, device=dev, dtype=bf)
            dgu = torch.randn(S, 2 * s.F, device=dev, dtype=bf)          # [du | dg], rows grouped by expert
            du, dg = dgu[:, :s.F], dgu[:, s.F:]
            hw = torch.randn(S, s.F, device=dev, dtype=bf)
            w = torch.rand(T, s.k, device=dev)
            key = (s.E, s.k, s.H, s.F, bf, torch.device(dev), T)
            t_dual, t_down = tuning.tile("wgrad_dual", *key), tuning.tile("wgrad", *key)
            dw_gu = torch.empty(s.E, 2 * s.F, s.H, device=dev, dtype=bf)
            dw_d = torch.empty(s.E, s.H, s.F, device=dev, dtype=bf)

            def moec_dual():
                launch_wgrad(du, x, offsets, dw_gu[:, :s.F], t_dual, src=src, k=s.k, a2=dg, out2=dw_gu[:, s.F:])

            def moec_down():
                launch_wgrad(go, hw, offsets, dw_d, t_down, k=s.k, gather_a=(src, w))

            def gmm_dual():
                return torch._grouped_mm(dgu.t(), gather_rows(x, src, s.k), offs=offs)

            def gmm_down():
                return torch._grouped_mm(gather_rows(go, src, s.k).t(), hw, offs=offs)
            moec_dual(), moec_down()
            diff = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                       for a, b in ((gmm_dual(), dw_gu), (gmm_down(), dw_d)))
            f_dual, f_down = 2 * S * 2 * s.F * s.H / 1e12, 2 * S * s.F * s.H / 1e12
            cells = []
            for fn, f in ((moec_dual, f_dual), (gmm_dual, f_dual), (moec_down, f_down), (gmm_down, f_down)):
                ms = triton.testing.do_bench(fn)
                cells.append(f"{ms:.3f} ({f / ms * 1e3:.0f})")
            print(f"| {s.name} | {T} | {f_dual:.3f} / {f_down:.3f} | " + " | ".join(cells) + f" | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
