"""`flora export RUN_DIR --out DIR [--base BASE] [--merged]`: a run's adapter for another place
(flora.export_run)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a run's adapter (and optionally the merged model) for another place",
        description="Write RUN_DIR's final/adapter to --out with base_model_name_or_path set "
        "to --base (a local copy of the base, a model spec or a hub id; default: the base the "
        "run names, made absolute), so PeftModel.from_pretrained and AutoPeftModelForCausalLM "
        "load it from --out alone; --merged also writes --out/merged, the base with the adapter "
        "merged in (a plain transformers checkpoint).",
    )
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    parser.add_argument("--base", help="the base the exported adapter names")
    parser.add_argument(
        "--merged", action="store_true", help="also write --out/merged (base + adapter)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from flora.export_run import export_run

    base = export_run(args.run_dir, args.out, base=args.base, merged=args.merged)
    print(f"adapter of {args.run_dir} on {base} -> {args.out}/")
    if args.merged:
        print(f"merged model -> {args.out / 'merged'}/")
    return 0
