"""What CUTLASS's grouped GEMM (`torch._grouped_mm`) would save in moec's forward: moec's fused
gate/up launch (token gather in its A loads, activation in its epilogue, the pre-activations
stored for training) against gather + `torch._grouped_mm` into pre (S, 2F) + the activation pass
(codegen/act_kernel.py); moec's down launch against `torch._grouped_mm` on the same h. Shipped
tiles, bf16, routing from random logits; values checked against each other.

Run: python benchmarks/fwd_vs_grouped_mm.py [--shapes qwen3,olmoe,mixtral] [--tokens 8,64,4096,8192]
"""
import argparse
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(__file__))
from layers import SHAPES  # noqa: E402
from moec.codegen import grouped_mm_forward, tuning  # noqa: E402
from moec.codegen.act_kernel import activate_rows  # noqa: E402
from moec.codegen.down_kernel import launch_down  # noqa: E402
from moec.codegen.gather_kernel import gather_rows  # noqa: E402
from moec.codegen.gate_up_kernel import launch_gate_up  # noqa: E402
from moec.codegen.jit_helpers import ACTIVATION_CODE  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,olmoe,mixtral")
    ap.add_argument("--tokens", default="4096,8192")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| layer | tokens | TFLOP gate/up / down | moec gate_up+pre ms (TFLOP/s) | moec gate_up ms | "
          "gather ms | gmm gate_up ms (TFLOP/s) | act ms | gather+gmm+zero_tail+act ms | moec down ms (TFLOP/s) | "
          "gmm down + zero_tail ms (TFLOP/s) | rel diff h / y |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    dev, bf, act = "cuda", torch.bfloat16, ACTIVATION_CODE["silu"]
    for name in args.shapes.split(","):
        s = SHAPES[name]
        for T in map(int, args.tokens.split(",")):
            S, F, H, E = T * s.k, s.F, s.H, s.E
            offsets, src, _ = torch.ops.moec.plan(torch.randn(T, E, device=dev).topk(s.k, dim=1).indices, E)
            offs = offsets[1:].to(torch.int32)
            x = torch.randn(T, H, device=dev, dtype=bf)
            w_gu = torch.randn(E, 2 * F, H, device=dev, dtype=bf) / H ** 0.5     # u | g rows, as pre
            w_d = torch.randn(E, H, F, device=dev, dtype=bf) / F ** 0.5
            w_up, w_gate = w_gu[:, :F], w_gu[:, F:]
            key = (E, s.k, H, F, bf, torch.device(dev), T)
            t_up, t_down = tuning.tile("gate_up", *key), tuning.tile("down", *key)
            h, h2 = torch.empty(S, F, device=dev, dtype=bf), torch.empty(S, F, device=dev, dtype=bf)
            pre = torch.empty(S, 2 * F, device=dev, dtype=bf)
            y = torch.empty(S, H, device=dev, dtype=bf)

            def moec_gate_up(save=True):
                launch_gate_up(x, src, offsets, s.k, w_up, w_gate, None, None, act, 1.0, 0.0, t_up, h,
                               pre=pre if save else None)

            def gather():
                return gather_rows(x, src, s.k)
            xg = gather()

            def gmm_gate_up():
                return torch._grouped_mm(xg, w_gu.transpose(1, 2), offs=offs)
            p2 = gmm_gate_up()

            def act_pass():
                activate_rows(p2, h2, offsets, 0, F, act, 1.0, 0.0, True)

            def cutlass_path():      # what experts_forward runs with the switch on
                pre_rows = grouped_mm_forward.gate_up_rows(x, src, s.k, offsets, w_gu, False)
                activate_rows(pre_rows, h2, offsets, 0, F, act, 1.0, 0.0, True)

            def moec_down():
                launch_down(h, w_d.transpose(1, 2), y, offsets, t_down)

            def gmm_down():
                return grouped_mm_forward.down_rows(h, w_d, offsets)
            moec_gate_up(), cutlass_path(), moec_down()
            diff = f"{rel(h2, h):.1e} / {rel(gmm_down(), y):.1e}"
            f_gu, f_d = 2 * S * 2 * F * H / 1e12, 2 * S * F * H / 1e12
            ms = {n: triton.testing.do_bench(fn) for n, fn in (
                ("moec_gu", moec_gate_up), ("moec_gu_nopre", lambda: moec_gate_up(False)), ("gather", gather),
                ("gmm_gu", gmm_gate_up), ("act", act_pass), ("cutlass", cutlass_path), ("moec_d", moec_down),
                ("gmm_d", gmm_down))}
            cells = [f"{ms['moec_gu']:.3f} ({f_gu / ms['moec_gu'] * 1e3:.0f})", f"{ms['moec_gu_nopre']:.3f}",
                     f"{ms['gather']:.3f}", f"{ms['gmm_gu']:.3f} ({f_gu / ms['gmm_gu'] * 1e3:.0f})",
                     f"{ms['act']:.3f}", f"{ms['cutlass']:.3f}",
                     f"{ms['moec_d']:.3f} ({f_d / ms['moec_d'] * 1e3:.0f})",
                     f"{ms['gmm_d']:.3f} ({f_d / ms['gmm_d'] * 1e3:.0f})"]
            print(f"| {s.name} | {T} | {f_gu:.3f} / {f_d:.3f} | " + " | ".join(cells) + f" | {diff} |", flush=True)


if __name__ == "__main__":
    main()
