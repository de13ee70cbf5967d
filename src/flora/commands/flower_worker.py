"""`flora flower-worker --supernode HOST:PORT | --socket PATH`: a node's warm worker for Flower
(flora.flower.worker)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flora.errors import FloraError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flower-worker",
        help="serve a Flower node's train/evaluate messages from one warm process",
        description="Serve this machine's SuperNode's flora messages from one long-lived "
        "process that imports torch and loads the model once. --supernode HOST:PORT: be the "
        "executor of a SuperNode started with --isolation process (its ClientApp tasks run "
        "here; no process per message). --socket PATH: serve the ClientApp processes Flower "
        'starts per message (start it before the SuperNode, with --node-config "... '
        "worker='PATH'\"). Stops on SIGTERM/SIGINT. Needs the [flower] extra.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path, help="Unix socket path to listen on (relay mode)")
    where.add_argument(
        "--supernode",
        metavar="HOST:PORT",
        help="be the executor of the SuperNode serving its runtime API here (started with "
        "--isolation process): no process per message",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        from flora.flower.worker import serve
    except ImportError as error:
        raise FloraError(
            f"flower-worker needs Flower ({error}); pip install 'flora-lora[flower]'"
        ) from None
    if args.threads < 0:
        raise FloraError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.supernode:
        from flora.flower.worker import serve_node

        return serve_node(args.supernode)
    return serve(args.socket)
