"""One of moec's kernel-level switches off against on, in one process: a compiled moec training
step (forward + backward, bf16, as `moec_compiled` runs the HF-style grouped_mm layer) captured in
a CUDA graph per setting, the replays alternated three times so clock drift does not pick the
winner; each setting's peak memory, and how far its gradients are from the other's.

  grouped_mm        the backward's CUTLASS GEMMs (codegen/grouped_mm_wgrad.py): dW_down, and where gate
                    and up share a base, the input gradient's rows and the gate/up gradient
  grouped_mm_down   dW_down alone through it
  wgrad_stream      the weight gradients on a second stream (codegen/streams.py)
  grouped_mm_forward  the forward's gate/up and down GEMMs on CUTLASS (codegen/grouped_mm_forward.py)
  grouped_mm_forward_down  its down GEMM alone

Run: python benchmarks/switch_ab.py --switch grouped_mm [--shapes mixtral,qwen3] [--tokens 4096]
         [--out DIR]    (writes switch_ab.json and switch_ab.md there)
"""
import argparse
import datetime
import json
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import capture, make_step, moec_compiled, peak_mib  # noqa: E402
from layers import SHAPES, make_params  # noqa: E402
from moec.codegen import grouped_mm_forward, grouped_mm_wgrad, streams  # noqa: E402

_JOINT = grouped_mm_wgrad.joint_gate_up


def _grouped_mm(on, joint=True):
    grouped_mm_wgrad.ENABLED = on
    grouped_mm_wgrad.joint_gate_up = _JOINT if joint else (lambda *a: None)


SWITCHES = {
    "grouped_mm": _grouped_mm,
    "grouped_mm_down": lambda on: _grouped_mm(on, joint=False),
    "wgrad_stream": streams.set_wgrad_stream,
    "grouped_mm_forward": lambda on: (setattr(grouped_mm_forward, "DOWN", on), setattr(grouped_mm_forward, "GATE_UP", on)),
    "grouped_mm_forward_down": lambda on: setattr(grouped_mm_forward, "DOWN", on),
}


def grads(fn, params, x, probe):
    leaves = [x] + [t for t in params.values() if t.requires_grad]
    return torch.autograd.grad((fn(x) * probe).sum(), leaves)


def compare(switch, s, T, reps=3):
    """-> a row: the two settings' replay times (ms, each run), peaks (MiB), gradients' distance."""
    torch.manual_seed(0)
    p = make_params(s, "cuda")
    x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    probe = torch.randn(x.shape, device="cuda", dtype=x.dtype)
    graphs, peaks, got = {}, {}, {}
    for on in (False, True):
        SWITCHES[switch](on)
        # compiled afresh per setting: a switch may change what an op returns (grouped_mm: du and dg as one
        # buffer), which the compiled graph's shapes and Inductor's size asserts were traced with; Dynamo's
        # cache is per code object (moec_compiled's lambda), so it is emptied first
        torch._dynamo.reset()
        fn = moec_compiled(s, p)
        step = make_step(fn, p, x, True)
        got[on] = grads(fn, p, x, probe)
        peaks[on] = peak_mib(step)
        graphs[on] = capture(step)
    SWITCHES[switch](False)
    diff = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
               for a, b in zip(got[True], got[False]))
    runs = {False: [], True: []}
    for _ in range(reps):
        for on in (False, True):
            runs[on].append(triton.testing.do_bench(graphs[on].replay, warmup=10, rep=100, return_mode="median"))
    off, on = min(runs[False]), min(runs[True])
    return {"layer": s.name, "tokens": T, "off_ms": off, "on_ms": on, "off_runs": runs[False],
            "on_runs": runs[True], "speedup": off / on, "off_peak_mib": peaks[False], "on_peak_mib": peaks[True],
            "grad_rel_diff": diff}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", choices=sorted(SWITCHES), required=True)
    ap.add_argument("--shapes", default="qwen3,olmoe,gptoss,mixtral")
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "switch": args.switch, "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    print(json.dumps(info))
    lines = [f"| layer | tokens | off ms | on ms | on speedup | peak MiB off / on | grads rel. diff |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    for name in args.shapes.split(","):
        for T in map(int, args.tokens.split(",")):
            r = compare(args.switch, SHAPES[name], T)
            rows.append(r)
            lines.append(f"| {r['layer']} | {T} | {r['off_ms']:.3f} | {r['on_ms']:.3f} | {r['speedup']:.3f}x | "
                         f"{r['off_peak_mib']:.0f} / {r['on_peak_mib']:.0f} | {r['grad_rel_diff']:.1e} |")
            print(lines[-1], f"(runs off {r['off_runs']}, on {r['on_runs']})", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "switch_ab.json"), "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "switch_ab.md"), "w") as f:
            f.write(f"{info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']}: "
                    f"{args.switch} off vs on, compiled moec training step replayed from a CUDA graph\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
