"""`flora configs list | copy`: the shipped configs (as torchtune's `tune ls` and `tune cp`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flora.errors import FloraError
from flora.packaged import FLOWER_APP_DIR, describe_config, shipped_configs

__all__ = ["add_parser", "copy", "list_configs"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "configs",
        help="list the shipped configs, or copy one to edit it",
        description="The configs shipped with flora. `flora run NAME` runs one as it is; "
        "`flora configs copy NAME DIR` copies it to DIR to edit.",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="name and description of each shipped config")
    listing.set_defaults(handler=list_configs)
    copying = actions.add_parser(
        "copy",
        help="copy a shipped config to a directory (never over an existing file)",
        description="Copy the shipped config NAME to DIR/NAME.toml (DIR is created if needed), "
        "or to DEST if it ends in .toml. An existing file is never overwritten.",
    )
    copying.add_argument("name", metavar="NAME", help="a shipped config, e.g. tiny")
    copying.add_argument("dest", metavar="DIR", help="destination directory (or a .toml path)")
    copying.set_defaults(handler=copy)


def list_configs(args: argparse.Namespace) -> int:
    configs = shipped_configs()
    width = max(len(name) for name in configs) + 2
    for name, path in configs.items():
        print(f"{name:<{width}}{describe_config(path)}")
    print("\nrun one with `flora run NAME`; copy one to edit with `flora configs copy NAME DIR`")
    print(f"the Flower app: {FLOWER_APP_DIR} (`flwr run` that directory; see docs/flower.md)")
    return 0


def copy(args: argparse.Namespace) -> int:
    configs = shipped_configs()
    name = str(args.name).removesuffix(".toml")
    if name not in configs:
        raise FloraError(f"no shipped config {args.name!r}; shipped: {', '.join(configs)}")
    dest = Path(args.dest)
    if dest.suffix != ".toml" and dest.exists() and not dest.is_dir():
        raise FloraError(f"{dest} is a file, not a directory; give a directory or a .toml path")
    target = dest if dest.suffix == ".toml" else dest / f"{name}.toml"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "xb") as out:  # "x": never over an existing file, even in a race
            out.write(configs[name].read_bytes())
    except FileExistsError:
        raise FloraError(f"{target} already exists; remove it or copy to another place") from None
    print(f"copied {name} to {target}; run it with: flora run {target}")
    return 0
