"""`flora compare`: a table and plots over several run directories (report.md, report.html)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flora.errors import FloraError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare runs: table and plots in report.md / report.html",
        description="Compare run directories: one table row per run (method, ranks, final "
        "held-out loss, MMLU from RUN_DIR/eval/eval.json, bytes up and down, wall time, mean "
        "aggregation noise) and PNG plots (held-out loss by round, against cumulative downlink "
        "bytes, per category), written as OUT/report.md and OUT/report.html.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", default="compare", help="output directory (default: %(default)s)")
    parser.set_defaults(handler=run)


def _names(paths: list[Path]) -> list[str]:
    """Directory names, or the paths as given where two names collide."""
    names = [p.resolve().name for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def run(args: argparse.Namespace) -> int:
    from flora.evaluation import summarize_run, write_report
    from flora.evaluation.report import COLUMNS, table_rows

    paths = [Path(p) for p in args.runs]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise FloraError(f"no such run directory: {', '.join(missing)}")
    runs = [summarize_run(p, name) for p, name in zip(paths, _names(paths), strict=True)]
    out = Path(args.out)
    written = write_report(runs, out)
    rows = [COLUMNS, *table_rows(runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"\nwrote {', '.join(p.name for p in written)} to {out}/")
    return 0
