"""`flora flower-supernode [--idle-poll S] -- FLOWER-SUPERNODE-ARGS`: Flower's SuperNode with
its idle waits capped (flora.flower.supernode)."""

from __future__ import annotations

import argparse

from flora.errors import FloraError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flower-supernode",
        help="Flower's flower-supernode, polling its SuperLink every --idle-poll s (not 3 s)",
        description="Run Flower's own SuperNode with every flag after `--` passed unchanged, "
        "its idle wait for a message (3 s in Flower 1.41) and its wait for a reply (0.5 s) "
        "capped at --idle-poll seconds. Needs the [flower] extra.",
    )
    parser.add_argument(
        "--idle-poll", type=float, default=0.2, help="seconds between idle pulls (default 0.2)"
    )
    parser.add_argument("supernode_args", nargs=argparse.REMAINDER, help="flower-supernode's")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 0.01 <= args.idle_poll <= 3:
        raise FloraError(f"--idle-poll must be within 0.01..3 seconds, got {args.idle_poll}")
    try:
        from flora.flower.supernode import run as supernode
    except ImportError as error:
        needs = f"flower-supernode needs Flower ({error}); pip install '.[flower]'"
        raise FloraError(needs) from None
    rest = list(args.supernode_args)
    supernode(rest[1:] if rest[:1] == ["--"] else rest, args.idle_poll)
    return 0
