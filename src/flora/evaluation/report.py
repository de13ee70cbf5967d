"""`flora compare`'s report: a table of runs and its plots, as report.md and report.html.

Each run keeps one colour, marker and line style in every plot, so runs with equal curves stay
visible; rounds are integers; a line joins only consecutive evaluated rounds (a run evaluated
at rounds 0 and N shows two points, not a line that looks like data); bytes are in MB and MMLU
in %; per-category bars show the change against the base model (round 0), so small differences
show. A centralized run has no communication or aggregation: its bytes and noise are "n/a".
The PNGs sit beside report.md (linked) and are embedded in report.html (base64), so the HTML
file travels alone; both carry the footnotes and each run's setup.
"""

from __future__ import annotations

import base64
import dataclasses
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from flora.evaluation.runs import RunSummary
from flora.io import atomic_write_text

__all__ = [
    "COLUMNS",
    "footnotes",
    "format_bytes",
    "plot_runs",
    "segments",
    "table_rows",
    "write_report",
]

COLUMNS = [
    "run",
    "method",
    "ranks",
    "final held-out loss",
    "change vs base",
    "MMLU ¹",
    "MB up ²",
    "MB down ²",
    "wall time",
    "mean noise ³",
]
_DASH = "–"
_NA = "n/a"
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
_STYLES = ["-", "--", "-.", ":"]


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _mb(count: int) -> str:
    return f"{count / 1e6:.3f}" if count < 1e7 else f"{count / 1e6:.1f}"


def _num(value: float | None, spec: str) -> str:
    return _DASH if value is None else format(value, spec)


def _mmlu(run: RunSummary) -> str:
    """ "24.1% ± 1.3" (the standard error in percentage points), or "24.1%" without one."""
    if run.mmlu is None or run.mmlu_stderr is None:
        return _num(run.mmlu, ".1%")
    return f"{run.mmlu:.1%} ± {run.mmlu_stderr * 100:.1f}"


def _change(run: RunSummary) -> str:
    if run.final_loss is None or run.before_loss is None:
        return _DASH
    return f"{run.final_loss - run.before_loss:+.4f}"


def table_rows(runs: Sequence[RunSummary]) -> list[list[str]]:
    """One row of COLUMNS per run, formatted."""
    return [
        [
            run.name,
            run.method,
            run.ranks,
            _num(run.final_loss, ".4f"),
            _change(run),
            _mmlu(run),
            _NA if run.centralized else _mb(run.bytes_up),
            _NA if run.centralized else _mb(run.bytes_down),
            _DASH if run.seconds is None else f"{run.seconds:.0f} s",
            _NA if run.centralized else _num(run.noise, ".2e"),
        ]
        for run in runs
    ]


def footnotes(runs: Sequence[RunSummary]) -> list[str]:
    """The table's footnotes: where each MMLU figure comes from, what the bytes and noise are."""
    sources = [f"{run.name}: {run.mmlu_source}" for run in runs if run.mmlu_source]
    mixed = len({s.split(",")[0].split(" after")[0] for s in (r.mmlu_source for r in runs) if s})
    lines = [
        "¹ MMLU: lm-evaluation-harness's `mmlu` accuracy (weighted by subject size) ± its "
        "standard error in points; from RUN_DIR/eval/eval.json (`flora eval RUN_DIR`), else the "
        "run's last in-run `mmlu` row (eval.mmlu). "
        + ("; ".join(sources) + "." if sources else "No run has an MMLU score.")
        + (" The sources differ: compare these figures with care." if mixed > 1 else ""),
        "² Bytes: sums over the client rows of metrics.jsonl (1 MB = 10^6 bytes); n/a for a "
        "centralized run, which communicates nothing.",
        "³ Mean aggregation noise: ||realised - exact||_F / ||exact||_F of each round's update, "
        "exact = sum_k p_k s_k B_k A_k, averaged over rounds (about 0 for exact methods); n/a "
        "for a centralized run.",
        "change vs base: final held-out loss minus the base model's (round 0).",
    ]
    return lines


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure on the Agg canvas, outside pyplot: no global state, no display."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _look(k: int) -> dict[str, Any]:
    """Run k's colour, marker, marker size and fill, and line style: distinct for the first 40
    runs; sizes shrink and fills alternate, so runs on the same points show as nested marks."""
    return {
        "color": f"C{k % 10}",
        "marker": _MARKERS[k % len(_MARKERS)],
        "markersize": 10.0 - 1.5 * (k % 4),
        "fill": k % 2 == 0,
        "linestyle": _STYLES[(k // 2) % len(_STYLES)],
    }


def segments(points: Sequence[tuple[float, float]], rounds: Sequence[int]) -> list[list[int]]:
    """Runs of consecutive rounds: only these are joined by a line."""
    runs: list[list[int]] = []
    for i, r in enumerate(rounds):
        if runs and rounds[runs[-1][-1]] == r - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _curves(ax: Axes, runs: Sequence[RunSummary], attr: str, scale: float = 1.0) -> bool:
    """Each run's curve of ``attr``: markers at every point, lines within consecutive rounds
    (the rounds come from ``loss_by_round`` / ``mmlu_by_round``)."""
    drawn = False
    handles: list[Line2D] = []
    for k, run in enumerate(runs):
        points = getattr(run, attr)
        if not points:
            continue
        rounds_attr = "mmlu_by_round" if attr == "mmlu_by_round" else "loss_by_round"
        rounds = [r for r, _ in getattr(run, rounds_attr)]
        look = _look(k)
        xs = [x * scale for x, _ in points]
        ys = [y for _, y in points]
        face = look["color"] if look["fill"] else "none"
        marks = {
            "marker": look["marker"],
            "markersize": look["markersize"],
            "markerfacecolor": face,
            "markeredgecolor": look["color"],
        }
        ax.plot(xs, ys, linestyle="none", alpha=0.85, zorder=3 + k, **marks)
        for seg in segments(points, rounds):
            if len(seg) > 1:
                ax.plot(
                    [xs[i] for i in seg],
                    [ys[i] for i in seg],
                    color=look["color"],
                    linestyle=look["linestyle"],
                    alpha=0.85,
                    zorder=2,
                )
        handles.append(
            Line2D(
                [], [], color=look["color"], linestyle=look["linestyle"], label=run.name, **marks
            )
        )
        drawn = True
    if drawn:
        ax.legend(
            handles=handles,
            fontsize="small",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0,
        )
    return drawn


def _finish(fig: Figure, ax: Axes, title: str, xlabel: str, ylabel: str, path: Path) -> Path:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _round_plot(runs: Sequence[RunSummary], path: Path) -> Path | None:
    fig, ax = _figure(7.6, 4.0)
    if not _curves(ax, runs, "loss_by_round"):
        return None
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    gaps = any(
        len(segments(r.loss_by_round, [x for x, _ in r.loss_by_round])) > 1
        for r in runs
        if r.loss_by_round
    )
    note = " (lines join consecutive rounds only)" if gaps else ""
    return _finish(fig, ax, "held-out loss by round" + note, "round", "held-out loss", path)


def _downlink_plot(runs: Sequence[RunSummary], path: Path) -> Path | None:
    federated = [r for r in runs if not r.centralized]
    fig, ax = _figure(7.6, 4.0)
    # every run keeps its look (its index); a centralized one is drawn as nothing
    shown = [r if not r.centralized else _without_curves(r) for r in runs]
    if not federated or not _curves(ax, shown, "loss_by_downlink", scale=1e-6):
        return None
    title = "held-out loss against communication"
    if len(federated) < len(runs):
        title += " (centralized runs left out)"
    return _finish(fig, ax, title, "cumulative downlink, all clients (MB)", "held-out loss", path)


def _without_curves(run: RunSummary) -> RunSummary:
    return dataclasses.replace(run, loss_by_downlink=[])


def _category_plot(runs: Sequence[RunSummary], path: Path) -> Path | None:
    with_data = [(k, run) for k, run in enumerate(runs) if run.category_change]
    if not with_data:
        return None
    categories = sorted({c for _, run in with_data for c in run.category_change})
    width = 0.8 / len(with_data)
    fig, ax = _figure(max(7.6, 1.0 * len(categories) + 2.5), 4.4)
    for j, (k, run) in enumerate(with_data):
        xs = [i + (j - (len(with_data) - 1) / 2) * width for i in range(len(categories))]
        ys = [
            (lambda c: c[1] - c[0])(run.category_change[c])
            if c in run.category_change
            else float("nan")
            for c in categories
        ]
        hatch = ["", "//", "..", "xx"][(k // 10) % 4]
        ax.bar(
            xs,
            ys,
            width=width,
            label=run.name,
            color=_look(k)["color"],
            hatch=hatch,
            edgecolor="black",
            linewidth=0.4,
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("held-out loss change per category against the base model (round 0)")
    ax.set_ylabel("final loss - base loss (lower is better)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _mmlu_plot(runs: Sequence[RunSummary], path: Path) -> Path | None:
    fig, ax = _figure(7.6, 4.0)
    if not _curves(ax, runs, "mmlu_by_round"):
        return None
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    return _finish(
        fig,
        ax,
        "MMLU accuracy by round (in-run eval.mmlu)",
        "round",
        "MMLU acc (weighted by subject size)",
        path,
    )


def plot_runs(runs: Sequence[RunSummary], out: Path) -> list[Path]:
    """The PNGs that have data: loss by round, against cumulative downlink, per-category change
    against the base model, MMLU by round."""
    out.mkdir(parents=True, exist_ok=True)
    made = [
        _round_plot(runs, out / "loss_round.png"),
        _downlink_plot(runs, out / "loss_downlink.png"),
        _category_plot(runs, out / "loss_category.png"),
        _mmlu_plot(runs, out / "mmlu_round.png"),
    ]
    return [path for path in made if path is not None]


def _setups(runs: Sequence[RunSummary]) -> list[str]:
    return [f"{run.name}: {run.setup}" for run in runs if run.setup]


def _markdown(runs: Sequence[RunSummary], images: list[Path]) -> str:
    rows = table_rows(runs)
    lines = ["# flora compare", "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += ["", *(f"{note}  " for note in footnotes(runs)), ""]
    if _setups(runs):
        lines += ["Runs:", "", *(f"- {setup}" for setup in _setups(runs)), ""]
    lines += [f"![{image.stem}]({image.name})\n" for image in images]
    return "\n".join(lines)


def _html(runs: Sequence[RunSummary], images: list[Path]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>\n"
        for row in table_rows(runs)
    )
    notes = "".join(f"<p class='note'>{html.escape(note)}</p>\n" for note in footnotes(runs))
    setups = "".join(f"<li>{html.escape(setup)}</li>" for setup in _setups(runs))
    figures = "".join(
        f'<p><img alt="{image.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(image.read_bytes()).decode("ascii")}"></p>\n'
        for image in images
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.note{font-size:small;margin:0.2em 0}"
    )
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>flora compare</title>"
        f"<style>{style}</style></head><body>\n<h1>flora compare</h1>\n"
        f"<table><tr>{head}</tr>\n{body}</table>\n{notes}"
        + (f"<p>Runs:</p><ul>{setups}</ul>\n" if setups else "")
        + f"{figures}</body></html>\n"
    )


def write_report(runs: Sequence[RunSummary], out: Path) -> list[Path]:
    """Write the PNGs, report.md and report.html into ``out``; return every file written."""
    images = plot_runs(runs, out)
    atomic_write_text(out / "report.md", _markdown(runs, images))
    atomic_write_text(out / "report.html", _html(runs, images))
    return [*images, out / "report.md", out / "report.html"]
