"""Timeline pictures of an overlap schedule (`moec.runtime.schedule_search.Schedule`), with matplotlib
(an optional dependency: `pip install moec[dump]`).

Two panels, the unchunked schedule above the chosen one on the same time axis, each with two
lanes: compute and communication. Chunk i has colour i in both lanes, so a chunk's dispatch,
experts and combine can be followed across; ops run whole are grey, weight-gradient ops placed
under an all-to-all are hatched.

    python -m moec.draw_schedule out.png --world 64 [the layer and link flags of moec.runtime.simulate]

`draw_backward` draws a `passes.schedule_wgrad` report the same way: the backward's predicted
timeline as AOT autograd ordered it, above the one with weight gradients under the all-to-alls.
"""
import sys

from moec.runtime.cost_model import Op
from moec.runtime.schedule_search import Event, LayerCosts, Schedule

from .errors import MoecError

_WHOLE, _WGRAD = "#bdbdbd", "#fdd49e"


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MoecError("drawing a schedule needs matplotlib, which is not installed: pip install moec[dump] "
                        "(or pip install matplotlib)") from e
    return plt


def draw_schedule(schedule: Schedule, path, title: str = "", compare_unchunked: bool = True, panels=None) -> None:
    """Write `path` (PNG); a MoecError where matplotlib is missing. panels: [(name, Schedule)] to
    draw instead of the unchunked and the chosen schedule, titled by `title` alone."""
    plt = _pyplot()
    given = panels is not None
    panels = panels if given else \
        ([("unchunked (k=1)", schedule.unchunked())] if compare_unchunked and schedule.k > 1 else []) + \
        [(f"chosen (k={schedule.k})", schedule)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 1.9 * len(panels) + 0.6), sharex=True, squeeze=False)
    colours = plt.get_cmap("tab10")
    end = max(s.step_s for _, s in panels) * 1e3
    for ax, (name, s) in zip(axes[:, 0], panels):
        for e in s.events:
            y = 1 if e.stream == "compute" else 0
            colour = _WGRAD if e.stage == "wgrad" else _WHOLE if e.chunk < 0 else colours(e.chunk % 10)
            width = (e.end - e.start) * 1e3
            ax.barh(y, width, left=e.start * 1e3, height=0.7, color=colour, edgecolor="#444444", lw=0.4,
                    hatch="//" if e.stage == "wgrad" else None)
            if width > end / 60:
                text = e.label if e.chunk < 0 or s.k == 1 else f"{e.label[:10]}{e.chunk}"
                ax.text(e.start * 1e3 + width / 2, y, text, ha="center", va="center", fontsize=6, clip_on=True,
                        rotation=90 if width < end / 25 else 0)
        if s.unplaced:
            ax.text(end, 1.45, f"+{sum(w.time_s for w in s.wgrads if w.name in s.unplaced) * 1e3:.3g} ms "
                    f"weight gradients run serially", ha="right", fontsize=7)
        ax.set_yticks([0, 1], ["comm", "compute"])
        ax.set_ylim(-0.6, 1.7)
        ax.set_title(f"{name}: {s.step_s * 1e3:.3f} ms, all-to-all exposed {s.exposed_comm_s * 1e3:.3f} ms",
                     fontsize=9, loc="left")
    axes[-1, 0].set_xlim(0, end * 1.01)
    axes[-1, 0].set_xlabel("ms")
    chunked = ", ".join(schedule.chunked_ops()) or "experts only"
    fig.suptitle(title if given else f"{title + ': ' if title else ''}k={schedule.k}, chunked: {chunked}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_backward(report, path, title: str = "") -> None:
    """A `passes.schedule_wgrad` report's predicted backward: AOT autograd's order above, the
    weight gradients moved under the all-to-alls (hatched) below."""
    exposed = lambda which: sum(w.comm_s - getattr(w, f"hidden_{which}_s") for w in report.windows)
    panels = [("as AOT autograd ordered it",
               _as_schedule(report.timeline_before, report.step_before_s, exposed("before"))),
              ("weight gradients under the all-to-alls",
               _as_schedule(report.timeline_after, report.step_after_s, exposed("after")))]
    draw_schedule(panels[1][1], path, title or "backward", panels=panels)


def _as_schedule(timeline, step_s, exposed_s) -> Schedule:
    """Timeline events of a backward as a k=1 Schedule; runs of unmoved compute ops are merged
    into one bar each so the all-to-alls and the moved ops stay readable."""
    events, run = [], []

    def flush():
        if run:
            label = run[0].label if len(run) == 1 else f"{len(run)} ops"
            events.append(Event("compute", "pre", label, -1, run[0].start, run[-1].end))
            run.clear()
    for e in timeline:
        if e.stream == "compute" and not e.moved and (not run or abs(run[-1].end - e.start) < 1e-12):
            run.append(e)
            continue
        flush()
        if e.stream == "compute" and not e.moved:
            run.append(e)
        elif e.stream == "compute":
            events.append(Event("compute", "wgrad", e.label, -1, e.start, e.end))
        else:
            events.append(Event("comm", "dispatch", e.label, -1, e.start, e.end))
    flush()
    comm = sum(e.end - e.start for e in events if e.stream == "comm")
    none = LayerCosts((), 0.0, Op("experts", 0.0), 0.0, ())
    return Schedule(1, (0, 0), (0, 0), step_s, step_s, exposed_s, comm, tuple(sorted(events, key=lambda e: e.start)),
                    costs=none)


def main(argv=None) -> int:
    """Draw the full schedule `moec.runtime.simulate` predicts for one world size."""
    import argparse

    from moec.runtime import simulate
    p = argparse.ArgumentParser(prog="python -m moec.draw_schedule", description=main.__doc__)
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--world", type=int, default=64)
    simulate.add_setup_flags(p)
    a = p.parse_args(argv)
    setup, compute = simulate.setup_from(a)
    row = simulate.compare(setup, a.world, compute)
    draw_schedule(row["full"], a.out, title=f"world {a.world}, ep {row['ep']}")
    print(row["full"].explain())
    return 0


if __name__ == "__main__":
    sys.exit(main())
