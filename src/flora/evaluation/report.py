"""`flora compare`'s report: a table of runs and its plots, as report.md and report.html.

The PNGs sit beside report.md (linked) and are embedded in report.html (base64), so the HTML
file travels alone.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flora.evaluation.runs import RunSummary
from flora.io import atomic_write_text

__all__ = ["COLUMNS", "format_bytes", "plot_runs", "table_rows", "write_report"]

COLUMNS = [
    "run",
    "method",
    "ranks",
    "final held-out loss",
    "MMLU",
    "bytes up",
    "bytes down",
    "wall time",
    "mean noise",
]
_DASH = "–"


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _num(value: float | None, spec: str) -> str:
    return _DASH if value is None else format(value, spec)


def _mmlu(run: RunSummary) -> str:
    """ "24.1% ± 1.3" (the standard error in percentage points), or "24.1%" without one."""
    if run.mmlu is None or run.mmlu_stderr is None:
        return _num(run.mmlu, ".1%")
    return f"{run.mmlu:.1%} ± {run.mmlu_stderr * 100:.1f}"


def table_rows(runs: Sequence[RunSummary]) -> list[list[str]]:
    """One row of COLUMNS per run, formatted."""
    return [
        [
            run.name,
            run.method,
            run.ranks,
            _num(run.final_loss, ".4f"),
            _mmlu(run),
            format_bytes(run.bytes_up),
            format_bytes(run.bytes_down),
            _DASH if run.seconds is None else f"{run.seconds:.0f} s",
            _num(run.noise, ".2e"),
        ]
        for run in runs
    ]


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure on the Agg canvas, outside pyplot: no global state, no display."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _line_plot(
    runs: Sequence[RunSummary],
    attr: str,
    xlabel: str,
    title: str,
    path: Path,
    ylabel: str = "held-out loss",
) -> Path | None:
    curves = [(run.name, getattr(run, attr)) for run in runs if getattr(run, attr)]
    if not curves:
        return None
    fig, ax = _figure(6.4, 4.0)
    for name, points in curves:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _category_plot(runs: Sequence[RunSummary], path: Path) -> Path | None:
    with_data = [run for run in runs if run.per_category]
    if not with_data:
        return None
    categories = sorted({c for run in with_data for c in run.per_category})
    width = 0.8 / len(with_data)
    fig, ax = _figure(max(6.4, 0.9 * len(categories)), 4.2)
    for k, run in enumerate(with_data):
        xs = [i + (k - (len(with_data) - 1) / 2) * width for i in range(len(categories))]
        ys = [run.per_category.get(c, float("nan")) for c in categories]
        ax.bar(xs, ys, width=width, label=run.name)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_ylabel("held-out loss")
    ax.set_title("held-out loss per category (flora eval)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_runs(runs: Sequence[RunSummary], out: Path) -> list[Path]:
    """The PNGs that have data: loss vs round, loss vs cumulative downlink, per category."""
    out.mkdir(parents=True, exist_ok=True)
    made = [
        _line_plot(
            runs, "loss_by_round", "round", "held-out loss by round", out / "loss_round.png"
        ),
        _line_plot(
            runs,
            "loss_by_downlink",
            "cumulative downlink bytes (all clients)",
            "held-out loss against communication",
            out / "loss_downlink.png",
        ),
        _category_plot(runs, out / "loss_category.png"),
        _line_plot(
            runs,
            "mmlu_by_round",
            "round",
            "MMLU accuracy by round (eval.mmlu)",
            out / "mmlu_round.png",
            ylabel="MMLU acc (weighted by subject size)",
        ),
    ]
    return [path for path in made if path is not None]


def _markdown(runs: Sequence[RunSummary], images: list[Path]) -> str:
    rows = table_rows(runs)
    lines = ["# flora compare", "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += ["", "MMLU: lm-evaluation-harness's `mmlu` accuracy (weighted by subject size) ± its "
              "standard error in points, from RUN_DIR/eval/eval.json (`flora eval RUN_DIR`), "
              "else the run's last `mmlu` row (eval.mmlu)."]  # fmt: skip
    lines += ["Bytes: sums over the client rows of metrics.jsonl.", ""]
    lines += [f"![{image.stem}]({image.name})\n" for image in images]
    return "\n".join(lines)


def _html(runs: Sequence[RunSummary], images: list[Path]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>\n"
        for row in table_rows(runs)
    )
    figures = "".join(
        f'<p><img alt="{image.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(image.read_bytes()).decode("ascii")}"></p>\n'
        for image in images
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}"
    )
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>flora compare</title>"
        f"<style>{style}</style></head><body>\n<h1>flora compare</h1>\n"
        f"<table><tr>{head}</tr>\n{body}</table>\n{figures}</body></html>\n"
    )


def write_report(runs: Sequence[RunSummary], out: Path) -> list[Path]:
    """Write the PNGs, report.md and report.html into ``out``; return every file written."""
    images = plot_runs(runs, out)
    atomic_write_text(out / "report.md", _markdown(runs, images))
    atomic_write_text(out / "report.html", _html(runs, images))
    return [*images, out / "report.md", out / "report.html"]
