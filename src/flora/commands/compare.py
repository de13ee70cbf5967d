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
        "held-out loss and its change against the base model, MMLU with its source, MB up and "
        "down, wall time, mean aggregation noise), footnotes, each run's setup, and PNG plots "
        "(held-out loss by round, against cumulative downlink MB, its per-category change "
        "against the base model, MMLU by round), written as OUT/report.md and OUT/report.html.",
    )
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="a run under a name of your choosing (repeatable; with or without RUN_DIRs)",
    )
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
    names = _names(paths)
    for label in args.label:
        name, sep, path = label.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise FloraError(f"--label {label!r}: expected NAME=RUN_DIR, e.g. flora=runs/demo")
        paths.append(Path(path.strip()))
        names.append(name.strip())
    if not paths:
        raise FloraError("give run directories to compare (RUN_DIR ... or --label NAME=RUN_DIR)")
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise FloraError(f"no such run directory: {', '.join(missing)}")
    runs = [summarize_run(p, name) for p, name in zip(paths, names, strict=True)]
    out = Path(args.out)
    written = write_report(runs, out)
    rows = [COLUMNS, *table_rows(runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"\nwrote {', '.join(p.name for p in written)} to {out}/")
    return 0
