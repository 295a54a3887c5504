"""Pass debugging dumps: what moec received, what each pass did, what it found and chose.

    MOEC_DUMP=<dir>   or   torch.compile(..., backend="moec", options={"dump_dir": <dir>})

One folder per compiled graph, named by Dynamo's compile id (frame and attempt):

    index.md               one line per item below
    00_input.py            the graph moec received (GraphModule.code)
    01_detect.py ...       the graph after each pass, numbered in pipeline order
    regions.json / .md     regions found (router, experts, check) and near misses with reasons
    region_<i>.png         each region's subgraph, nodes grouped by role
    aot_forward.py / aot_backward.py   the graphs after AOT autograd (Inductor, aot_eager)
    wgrad_schedule.txt / _<i>.png      weight gradients moved under the backward's all-to-alls,
                           per all-to-all, with the predicted timelines before and after
    kernels.json           per region: which implementation runs and its launch settings

The runner calls the writer; passes never write files. `python -m moec.dump diff A B` compares
two dump folders. TORCH_TRACE artifacts (for tlparse) are emitted by `trace_artifact` whether or
not a dump folder is set, at the cost of nothing when tracing is off.
"""
import dataclasses
import json
import os
import re
import sys

import torch
import torch.fx as fx

from moec.passes.graph import hint

from .errors import MoecError
from .log import log


def trace_artifact(name: str, payload_fn) -> None:
    """A named string artifact in TORCH_TRACE, beside Inductor's; `payload_fn` runs only if on."""
    torch._logging.trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"},
                                    payload_fn=payload_fn)


class Dumper:
    """Writes one compile's folder. Every method is cheap to skip: the backend makes no Dumper
    unless a dump folder is set."""

    def __init__(self, root: str):
        self.dir = _fresh_dir(root, _compile_name())
        self.items = []      # (file, one-line description), in order
        self.pass_log = []   # (pass, ms, nodes before, nodes after)
        self.backward_reports = []
        self.captures = {}   # graph kind -> whether Inductor captures it in CUDA graphs

    def _write(self, name, text, what):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(text)
        self._add(name, what)

    def _add(self, name, what):
        # The index is rewritten with every item: the backward graph arrives only at the first
        # backward call, long after the compile returned.
        if name not in (n for n, _ in self.items):   # a file rewritten as more arrives is listed once
            self.items.append((name, what))
        self._write_index()

    def graph(self, step: int, name: str, gm: fx.GraphModule, changed: bool = True):
        what = "the graph moec received" if step == 0 else \
            f"after pass `{name}`" + ("" if changed else " (unchanged)")
        self._write(f"{step:02d}_{name}.py", _readable(gm), what)

    def regions(self, detect_report, rewrite_report):
        rows = region_rows(detect_report, rewrite_report)
        self._write("regions.json", json.dumps(rows, indent=1, default=str), "regions found and missed (JSON)")
        self._write("regions.md", regions_markdown(rows), "regions found and missed, with reasons")

    def region_pictures(self, gm, detect_report):
        from .draw import draw_region
        for i, region in enumerate(detect_report.regions):
            path = os.path.join(self.dir, f"region_{i}.png")
            # a region inside an activation-checkpoint body lives in that body's graph, not the root's
            owner = gm.get_submodule(region.graph) if region.graph else gm
            if draw_region(owner.graph, region, path, title=region.module or "<root>"):
                self._add(f"region_{i}.png", f"region {region.module or '<root>'}, nodes by role")

    def aot_graph(self, kind: str, gm):
        # aot_eager compiles each dense partition apart: one file per graph, in compile order
        n = sum(1 for name, _ in self.items if name.startswith(f"aot_{kind}"))
        name = f"aot_{kind}.py" if n == 0 else f"aot_{kind}_{n}.py"
        self._write(name, _readable(gm), f"{kind} graph after AOT autograd" + (f" (graph {n})" if n else ""))

    def backward_report(self, report):
        """A `moec.backward.BackwardReport` (one per backward graph: aot_eager has one per partition)."""
        self.backward_reports.append(report)
        text = "\n\n".join(f"# backward graph {i}\n{r.text()}" for i, r in enumerate(self.backward_reports))
        self._write("wgrad_schedule.txt", text + "\n", "weight gradients moved under the backward's all-to-alls")
        if report.schedule.windows:
            from .draw_schedule import draw_backward
            i = len(self.backward_reports) - 1
            self._picture(draw_backward, report.schedule, f"wgrad_schedule_{i}.png", f"backward graph {i}",
                          "predicted backward timeline: AOT's order, then weight gradients scheduled")

    def schedules(self, report):
        """A `chunk_tokens` report: per layer the chosen schedule explained, and its timeline."""
        for i, layer in enumerate(report.layers):
            self._write(f"schedule_{i}.txt", layer.text() + "\n", f"token chunks of {layer.site}: k and why")
            if layer.schedule is None:
                continue
            from .draw_schedule import draw_schedule
            self._picture(draw_schedule, layer.schedule, f"schedule_{i}.png", layer.site,
                          f"predicted timeline of {layer.site}: unchunked and chosen")

    def _picture(self, draw, schedule, name, title, what):
        try:
            draw(schedule, os.path.join(self.dir, name), title=title)
        except MoecError as e:      # matplotlib missing: the text file says it all
            log.info("no picture %s: %s", name, e)
            return
        self._add(name, what)

    def cudagraphs(self, kind: str, text: str):
        self.captures[kind] = text
        body = "\n".join(f"{k}: {v}" for k, v in self.captures.items()) + "\n"
        self._write("cudagraphs.txt", body, "whether Inductor captures each graph in CUDA graphs, or why not")

    def kernels(self, detect_report):
        from moec.codegen import decode_fused, fast_launch, kernels, pdl, router_plan_op, tuning, wgrad_kernel
        out = []
        for r in detect_report.regions:
            x = r.x.meta.get("example_value")
            T = hint(x.numel()) // r.experts.hidden
            probe = torch.empty(0, dtype=x.dtype, device=x.device)   # the rule reads dtype and device
            impl = "triton" if kernels.use_triton(probe) else "reference (PyTorch)"
            tiles = {name: dataclasses.asdict(tuning.tile(name, r.num_experts, r.top_k, r.experts.hidden,
                                                          r.experts.ffn, x.dtype, x.device, T))
                     for name in _TILED_KERNELS} if impl == "triton" else {}
            switches = {    # the environment's kernel-level switches (README, Options), as this process reads them
                "fast_launch": fast_launch.enabled(),
                "pdl": pdl.use(x, T),
                "wgrad_copy_mib": wgrad_kernel.copy_mib() or "one copy",
                "router_plan": router_plan_op.ENABLED,
                "inference_forward": decode_fused.describe(
                    decode_fused.expert_bytes(r.experts.gate is not None, r.experts.ffn, r.experts.hidden,
                                              x.element_size()),
                    _rows_along_hidden(r.experts), any(f is not None for f in r.experts.lora))}
            out.append({"module": r.module, "implementation": impl, "device": str(x.device),
                        "dtype": str(x.dtype), "tokens_at_compile": T, "token_bucket": tuning.bucket(T),
                        "tiles": tiles, "switches": switches if impl == "triton" else {}})
        self._write("kernels.json", json.dumps(out, indent=1),
                    "kernels chosen per region, with launch settings and the kernel-level switches in force")

    def finish(self, pass_log):
        self.pass_log = list(pass_log)
        self._write_index()
        log.info("moec dump written to %s", self.dir)

    def _write_index(self):
        lines = [f"# moec dump: {os.path.basename(self.dir)}", "", "| file | what |", "|---|---|"]
        lines += [f"| [{name}]({name}) | {what} |" for name, what in self.items]
        lines += ["", "## Passes", ""] + [f"{i}. `{name}`: {ms:.1f} ms, {a} -> {b} nodes"
                                           for i, (name, ms, a, b) in enumerate(self.pass_log, 1)]
        with open(os.path.join(self.dir, "index.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


_TILED_KERNELS = ("gate_up", "down", "dh", "gate_up_bwd", "down_dx", "wgrad", "wgrad_dual")


def _rows_along_hidden(experts) -> bool:
    """Whether gate/up views read rows contiguous along the hidden axis: views of untransposed bases
    (moec's weights are (E, N, K) views of contiguous parameters; region.Experts)."""
    return all(not view[1] for view in (experts.up, experts.gate) if view is not None)


def region_rows(detect_report, rewrite_report) -> list:
    """One plain record per region found and per miss: what the dumps, tlparse and diff read."""
    rewritten = set(getattr(rewrite_report, "rewritten", ()))
    rows = [region_record(r, r.module in rewritten) for r in detect_report.regions]
    rows += [{"module": m.module, "status": "missed", "kind": m.kind, "reason": m.reason, "where": m.where,
              "num_experts": m.num_experts, "top_k": m.top_k} for m in detect_report.misses]
    return rows


def region_record(r, fused: bool) -> dict:
    """The region as the dumps and tlparse show it: the detection record, in plain values."""
    return {"module": r.module, "status": "fused" if fused else "found, not rewritten", "idiom": r.idiom,
            "num_experts": r.num_experts, "top_k": r.top_k,
            "router": {**_fields(r.router), "kind": r.router.kind, "score_dtype": str(r.router.score_dtype)},
            "experts": {k: (_spec(v) if isinstance(v, tuple) else v) for k, v in _fields(r.experts).items()},
            "score_bias": getattr(r.score_bias, "name", None), "tokens": r.x.name, "logits": r.logits.name,
            "output": r.output.name, "nodes": len(r.nodes), "check": r.check}


def regions_markdown(rows) -> str:
    head = "| module | status | router | idiom | E | k | reason / check |\n|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['module'] or '<root>'} | {r['status']} | {r.get('router', {}).get('kind', '')} | {r.get('idiom', '')} "
        f"| {r['num_experts']} | {r['top_k']} | {r.get('reason') or r.get('check', '')}"
        f"{' [' + r['where'] + ']' if r.get('where') else ''} |\n" for r in rows)
    return head + body if rows else "No MoE regions found.\n"


def _fields(record) -> dict:
    # shallow: dataclasses.asdict would deep-copy the fx.Nodes (and their fake tensors) inside
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _spec(v):
    # (node, transposed, slice) views of expert weights, printed by name
    return [getattr(e, "name", e) for e in v]


_HEADER = '''# A graph moec dumped: runnable as `Graph()(*inputs)` with the graph's inputs, in order.
import math
import operator

import torch
from torch import device

inf, nan = math.inf, math.nan


class Graph(torch.nn.Module):
'''


def _readable(gm) -> str:
    code = gm.code if hasattr(gm, "code") else str(gm)
    return _HEADER + "\n".join(("    " + line) if line.strip() else "" for line in code.strip("\n").splitlines()) + "\n"


def _compile_name() -> str:
    cid = torch._guards.CompileContext.current_compile_id()
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", f"graph_{cid}" if cid is not None else "graph").strip("_")


def _fresh_dir(root, name):
    os.makedirs(root, exist_ok=True)
    path, n = os.path.join(root, name), 1
    while os.path.exists(path):
        path, n = os.path.join(root, f"{name}.{n}"), n + 1
    os.makedirs(path)
    return path


if __name__ == "__main__":
    from .dump_diff import main
    sys.exit(main(sys.argv[1:]))
