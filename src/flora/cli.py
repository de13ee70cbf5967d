"""flora's command line: `flora aggregate | run | eval | compare | configs ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flora import __version__
from flora.commands import aggregate, compare, configs, flower_worker, run
from flora.commands import eval as eval_command
from flora.errors import FloraError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flora",
        description="Federated fine-tuning of LLMs with heterogeneous-rank LoRA adapters "
        "(FLoRA stacking and the competing aggregation methods).",
    )
    parser.add_argument("--version", action="version", version=f"flora {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    aggregate.add_parser(subparsers)
    run.add_parser(subparsers)
    eval_command.add_parser(subparsers)
    compare.add_parser(subparsers)
    configs.add_parser(subparsers)
    flower_worker.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; bad input exits 2 with a one-line error and no traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except FloraError as error:
        print(f"flora: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
