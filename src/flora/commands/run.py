"""`flora run`: a federated fine-tuning on the embedded runtime, or its resumption."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flora.config import RunConfig, load_config
from flora.errors import FloraError
from flora.flower.home import own_flower_home
from flora.packaged import config_path
from flora.quiet import quieted
from flora.runtimes import RUNTIMES, driver, owner

if TYPE_CHECKING:
    pass

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="federated LoRA fine-tuning from a TOML config (or --resume a run)",
        description="Run a federated fine-tuning: clients with per-client LoRA ranks train on "
        "their data partitions, the server aggregates with the configured method, every round is "
        "checkpointed. Results: RUN_DIR/{config.json, metrics.jsonl, checkpoints/, final/}.",
    )
    parser.add_argument(
        "config",
        nargs="?",
        help="TOML config: a path, or a shipped config's name (`flora configs list`), e.g. tiny",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set federation.rounds=3 (repeatable)",
    )
    parser.add_argument("--out", help="run directory (default: runs/<config name>-<time>)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="with --resume: run until round N (extends a finished run)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and print it resolved, the client data table and the bytes each "
        "round sends per client, then exit without training or writing anything",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar or tables, and no third-party progress bars, warnings or banners "
        "(transformers, the hub, datasets, Flower, Ray): only the result lines",
    )
    parser.add_argument(
        "--runtime",
        choices=list(RUNTIMES),
        default="embedded",
        help="; ".join(
            f"{e.name}: {e.help}" + (f" (needs `{e.install}`)" if e.install else "")
            for e in RUNTIMES.values()
        ),
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # before anything heavy is imported: the libraries read these switches when imported
    with contextlib.ExitStack() as stack:
        stack.enter_context(quieted(args.quiet))
        if args.dry_run:
            return _dry_run(args)
        if RUNTIMES[args.runtime].flower_home:
            stack.enter_context(own_flower_home())
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from flora.config import load_run_config
    from flora.outputs import finished

    simulate = driver(args.runtime)
    if args.resume:
        if args.config or args.overrides:
            raise FloraError("--resume takes the run's own config.json; drop CONFIG and --set")
        run_dir = Path(args.resume)
        config = _extended(load_run_config(run_dir), args.rounds)
        ran_on = owner(run_dir)
        if ran_on is not None and ran_on != args.runtime:
            raise FloraError(f"{run_dir} ran on {ran_on}; resume it with --runtime {ran_on}")
        if finished(run_dir, config.federation.rounds):
            print(
                f"{run_dir} finished all {config.federation.rounds} rounds; nothing changed "
                f"(extend it with: flora run --resume {run_dir} --rounds N)"
            )
            return 0
        result = simulate(config, run_dir, resume=True, quiet=args.quiet)
    else:
        if not args.config:
            raise FloraError(
                "give a CONFIG.toml or a shipped config's name (`flora configs "
                "list`), or --resume RUN_DIR"
            )
        if args.rounds is not None:
            raise FloraError(
                "--rounds extends a run: use it with --resume RUN_DIR (for a new "
                "run, --set federation.rounds=N)"
            )
        config, run_dir = _new_run(args)
        result = simulate(config, run_dir, quiet=args.quiet)
    saved = "final/adapter, final/model" if config.output.model else "final/adapter"
    print(f"\nresults in {result.run_dir}/ (metrics.jsonl, {saved}, checkpoints/)")
    print(
        f"held-out loss: before {result.loss_before:.4f} -> after {result.loss_after:.4f} "
        f"({config.federation.method}, {config.federation.rounds} rounds, {result.seconds:.0f} s)"
    )
    shown = result.samples[:3]  # summary.json holds them all, the most changed first
    if shown:
        print(
            f"\nthe {len(shown)} of {len(result.samples)} held-out sample answers that changed "
            "most (greedy, no 3-gram twice):"
        )
    for sample in shown:
        print(f"\nprompt: {sample['instruction']}")
        print(f"before: {sample['before']}")
        print(f"after:  {sample['after']}")
    return 0


def _new_run(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """A new run's validated config and its run directory."""
    config = load_config(config_path(args.config), args.overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return config, Path(args.out or f"runs/{Path(args.config).stem}-{stamp}")


def _dry_run(args: argparse.Namespace) -> int:
    from flora.dry_run import dry_run

    if args.resume or args.rounds is not None:
        raise FloraError("--dry-run checks a new run's config: drop --resume and --rounds")
    if not args.config:
        raise FloraError("--dry-run needs a CONFIG.toml or a shipped config's name")
    config, run_dir = _new_run(args)
    print(dry_run(config, run_dir))
    if args.runtime == "flower-sim":
        from flora.flower.sim import flwr_run_command
        from flora.packaged import config_path

        command = flwr_run_command(config, config_path(args.config), args.overrides, run_dir)
        print(
            f"\nthe same on Flower's own command line (its local simulation federation):\n{command}"
        )
    return 0


def _extended(config: RunConfig, rounds: int | None) -> RunConfig:
    """The run's config, with ``--rounds`` as its new last round."""
    from flora.config import extend_rounds

    return config if rounds is None else extend_rounds(config, rounds)
