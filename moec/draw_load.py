"""The expert-load chart `moec.dump_stats` writes, drawn with matplotlib (optional: `pip install moec[dump]`).

One row per MoE layer, one cell per expert, coloured by the expert's copies over the layer's mean
(1.0 = even load; white), with each layer's max/mean and dropped copies beside its row.
"""
from .log import log


def draw_expert_load(rows, path) -> bool:
    """rows: `LayerLoad.to_dict()`s. Write `path` (PNG); False, with a log line, without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("moec.dump_stats: matplotlib is not installed; expert_load.png skipped (pip install moec[dump])")
        return False
    width = max(len(r["counts"]) for r in rows)
    share = [[c / (r["routed"] / len(r["counts"])) if r["routed"] else float("nan") for c in r["counts"]]
             + [float("nan")] * (width - len(r["counts"])) for r in rows]     # (layers, E)
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.3 * width), 1.2 + 0.35 * len(rows)))
    image = ax.imshow(share, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [r["layer"] for r in rows], fontsize=7)
    ax.set_xlabel("expert")
    for y, r in enumerate(rows):
        ax.text(width - 0.3, y, f"  max/mean {r['imbalance']:.2f}, dropped {r['dropped']}, {r['steps']} steps",
                va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="copies / layer mean", fraction=0.03, pad=0.25)
    ax.set_title("expert load")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
