"""Table and bar chart of bench_training.json (tokens/s per variant).

    python benchmarks/plot_training.py results/bench_training_h100.json results/bench_training_h100.md \
        results/bench_training_h100.png

The markdown's heading and table come from the JSON; the reading of them is written by hand, so the
text from an existing file's "Read:" line on is kept when the table is rewritten.
"""
import json
import os
import sys


def _fused(row):
    """MoE regions moec fused for this cell ('-' where the cell did not compile with moec)."""
    if not row["variant"].startswith("moec"):
        return "-"
    return str(row.get("moec", {}).get("regions_fused", 0))


def table(data):
    meta, s = data["meta"], data["meta"]["shape"]
    lines = ["# Training a small Qwen3-MoE-like causal LM", "",
             f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
             f"{meta['date']}. `benchmarks/bench_training.py`: {s['layers']} decoder layers at Qwen3-30B-A3B widths "
             f"(H {s['hidden']}, {s['experts']} experts of width {s['expert_width']}, top-{s['k']}), 32k vocabulary, "
             f"batch {s['batch']} x {s['seq']} tokens, bf16 parameters, AdamW, router aux loss on; each cell its own "
             "process, 3 warm-up and 6 timed steps. MFU counts active parameters (experts k/E, no embedding table) over "
             "the measured bf16 GEMM rate. `_ckpt`: `gradient_checkpointing_enable()`; `_lora`: PEFT LoRA r=16 on the "
             "3D expert weights, everything else frozen. Plot: bench_training_h100.png.", "",
             "| variant | ms / step | tokens/s | MFU | peak GiB | MoE layers fused |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_mem_gib']:.1f} | {_fused(r)} |")
    return "\n".join(lines) + "\n"


def plot(data, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in data["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    names = [r["variant"] for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    bars = ax.barh(names, values, color=["C0" if n.startswith("moec") else "C1" for n in names])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=7, padding=2)
    ax.invert_yaxis()
    ax.set_xlabel("training tokens/s (higher is better)")
    ax.set_xlim(0, 1.15 * max(values))
    meta = data["meta"]
    ax.set_title(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def main(json_path, md_path, png_path):
    data = json.load(open(json_path))
    read = ""
    if os.path.exists(md_path):
        text = "\n" + open(md_path).read()
        if "\nRead:" in text:
            read = "\n" + text[text.index("\nRead:") + 1:]
    with open(md_path, "w") as f:
        f.write(table(data) + read)
    plot(data, png_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
