"""flora's command line: `flora aggregate | run | eval | compare | configs ...`."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from flora import __version__
from flora.commands import (
    aggregate,
    compare,
    configs,
    export,
    flower_supernode,
    flower_worker,
    models,
    run,
)
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
    export.add_parser(subparsers)
    compare.add_parser(subparsers)
    configs.add_parser(subparsers)
    models.add_parser(subparsers)
    flower_worker.add_parser(subparsers)
    flower_supernode.add_parser(subparsers)
    return parser


def _traceback_file() -> Path | None:
    """The current exception's full traceback, written to a file for a bug report (None: the
    file could not be written either)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.gettempdir()) / f"flora-error-{stamp}-{os.getpid()}.txt"
    try:
        path.write_text(traceback.format_exc(), encoding="utf-8")
    except OSError:
        return None
    return path


def _os_error(error: OSError) -> str:
    """One line for an OS failure: what, where, and what to do."""
    where = f" ({error.filename})" if error.filename else ""
    what = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device{where}: free space there (or point --out elsewhere) "
            "and resume with `flora run --resume RUN_DIR`: what was written before is kept"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}{where}: make it writable or choose another path"
    return f"{what}{where}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI. Bad input exits 2 with a one-line error and no traceback; an OS failure
    (disk full, permissions) exits 1 with one line naming the path; anything unexpected exits 1
    with one line and the file its full traceback went to (FLORA_DEBUG=1: the traceback itself)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except FloraError as error:
        print(f"flora: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flora: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("FLORA_DEBUG"):
            raise
        saved = _traceback_file()
        where = f"full traceback: {saved}" if saved else "set FLORA_DEBUG=1 for the traceback"
        if isinstance(error, OSError):
            print(f"flora: error: {_os_error(error)} ({where})", file=sys.stderr)
            return 1
        first = str(error).splitlines()[0] if str(error) else ""
        print(
            f"flora: unexpected error: {type(error).__name__}: {first[:300]} ({where}; please "
            "report it with that file)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
