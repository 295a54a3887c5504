"""Pictures for the dumps, drawn with matplotlib (an optional dependency: `pip install moec[dump]`).

A region is drawn as four columns, one per role (router, dispatch, experts, combine), each node
a box labelled with its op, placed top to bottom in graph order, with its data edges.
"""
from moec.passes.graph import DepGraph, op_name
from moec.passes.roles import ROLES, node_roles

from .log import log

_COLOURS = {"router": "#f4c27a", "dispatch": "#9ecae1", "experts": "#a1d99b", "combine": "#d4a6e6"}


def draw_region(graph, region, path, title="") -> bool:
    """Write `path` (PNG); False, with a log line, where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("moec dump: matplotlib is not installed; region pictures skipped (pip install moec[dump])")
        return False
    roles = node_roles(graph, region)
    rows = {role: [n for n in region.nodes if roles[n] == role] for role in ROLES}
    place = {n: (col, row) for col, role in enumerate(ROLES) for row, n in enumerate(rows[role])}
    depth = max(1, *(len(v) for v in rows.values()))
    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.32 * depth + 1.5)))
    deps = DepGraph.build(graph).deps
    for n, (c, r) in place.items():
        for d in deps[n]:
            if d in place:
                (c0, r0) = place[d]
                ax.plot([c0 * 3 + 0.6, c * 3 + 0.6], [-r0, -r], color="#888888", lw=0.5, zorder=1)
    for n, (c, r) in place.items():
        ax.text(c * 3, -r, op_name(n) or n.name, fontsize=7, va="center", zorder=2,
                bbox=dict(boxstyle="round,pad=0.2", fc=_COLOURS[roles[n]], ec="#555555", lw=0.5))
    for c, role in enumerate(ROLES):
        ax.text(c * 3, 1.2, f"{role} ({len(rows[role])})", fontsize=10, weight="bold")
    ax.set_xlim(-0.5, 12)
    ax.set_ylim(-depth - 0.5, 2)
    ax.axis("off")
    ax.set_title(f"{title}: {region.router.kind}, E={region.num_experts}, k={region.top_k}, {region.idiom}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
