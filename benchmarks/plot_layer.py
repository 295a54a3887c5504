"""Plot bench_layer.json: time per method relative to the roofline floor, one panel per layer."""
import json
import sys


def plot(json_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.load(open(json_path))
    rows = data["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4 * len(shapes), 7), squeeze=False)
    for j, shape in enumerate(shapes):
        for i, mode in enumerate(("fwd", "train")):
            ax = axes[i][j]
            sel = [r for r in rows if r["shape"] == shape and r["mode"] == mode]
            for m in ("floor_ms", "moec", "moec_compiled", "moec_unfused", "hf_loop", "hf_grouped_mm", "hf_grouped_mm_compiled", "sonicmoe"):
                pts = [(r["tokens"], r[m]) for r in sel if r.get(m)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m == "floor_ms" else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape} {mode}")
            ax.set_xlabel("tokens")
            ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=7)
    info = data["info"]
    fig.suptitle(f"{info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date'][:10]}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
