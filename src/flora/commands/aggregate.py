"""`flora aggregate`: combine PEFT adapter directories trained anywhere into a global adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from flora.aggregation.registry import METHODS, get_method
from flora.errors import FloraError

if TYPE_CHECKING:
    from flora.aggregation.report import AggregationReport
    from flora.factors import Adapter

__all__ = ["CLIENT_INFO", "add_parser", "run"]

CLIENT_INFO = "flora_client.json"  # written beside a client's adapter by flora's engine
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # flora.adapters' names, without importing torch
ADAPTER_CONFIG = "adapter_config.json"

_HELP = """\
Aggregate LoRA adapters (PEFT directories: adapter_model.safetensors + adapter_config.json) with
one of flora's methods and write the global adapter as a PEFT directory, loadable with
PeftModel.from_pretrained on the same base model, plus report.json (aggregation noise, bytes).

methods (exact = realised update equals sum_k p_k s_k B_k A_k):
"""


def _methods_help() -> str:
    width = max(len(name) for name in METHODS) + 2
    return _HELP + "".join(f"  {m.name:<{width}}{m.summary}\n" for m in METHODS.values())


def _option_flags() -> dict[str, list[str]]:
    """Option name -> the methods that take it, from the registry."""
    owners: dict[str, list[str]] = {}
    for method in METHODS.values():
        for option in method.options:
            owners.setdefault(option.name, []).append(method.name)
    return owners


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "aggregate",
        help="aggregate PEFT LoRA adapter directories into a global adapter",
        description=_methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="client adapters")
    parser.add_argument(
        "--method", default="flora", help=f"one of {', '.join(METHODS)} (default: flora)"
    )
    parser.add_argument(
        "--weights",
        help="comma-separated client weights, e.g. example counts 120,80,40 (normalised); "
        f"default: the 'examples' in each adapter's {CLIENT_INFO} if all have one, else equal",
    )
    parser.add_argument(
        "--out", default="aggregated", help="output directory (default: %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output adapter")
    parser.add_argument(
        "--max-update-norm",
        type=float,
        default=0.0,
        help="refuse a client whose ||s B A||_F in some module exceeds this (default: no bound)",
    )
    parser.add_argument(
        "--norm-multiple",
        type=float,
        default=100.0,
        help="... or exceeds this multiple of the other clients' median (0: off; default 100)",
    )
    parser.add_argument(
        "--norm-action",
        choices=("reject", "clip"),
        default="reject",
        help="reject: exit 2 naming the client (default); clip: scale it onto the bound",
    )
    for name, owners in _option_flags().items():
        option = METHODS[owners[0]].option(name)
        parser.add_argument(
            f"--{name}",
            type=option.type,
            choices=option.choices or None,
            help=f"{option.help} (default: {option.default})",
        )
    parser.set_defaults(handler=run)


def _parse_weights(text: str | None, directories: list[Path]) -> list[float] | None:
    if text is not None:
        try:
            return [float(part) for part in text.split(",")]
        except ValueError:
            raise FloraError(
                f"--weights '{text}': expected comma-separated numbers such as 120,80,40"
            ) from None
    counts = []
    for directory in directories:
        info = directory / CLIENT_INFO
        if not info.is_file():
            return None
        try:
            counts.append(float(json.loads(info.read_text(encoding="utf-8"))["examples"]))
        except (ValueError, KeyError, TypeError, RecursionError, OSError):
            raise FloraError(f"{info}: unreadable; it needs an 'examples' count") from None
    return counts


def _options(args: argparse.Namespace) -> dict[str, object]:
    chosen = {name: getattr(args, name) for name in _option_flags()}
    options = {name: value for name, value in chosen.items() if value is not None}
    valid = {option.name for option in METHODS[args.method].options}
    for name in options:
        if name not in valid:
            raise FloraError(f"--{name} applies to another method, not {args.method}; drop it")
    return options


def _refuse_duplicates(directories: list[Path]) -> None:
    """One line naming the first input given twice (the same directory, by its resolved path):
    it would be counted twice, silently."""
    seen: dict[Path, int] = {}
    for k, directory in enumerate(directories):
        where = directory.resolve()
        if where in seen:
            raise FloraError(
                f"{directory} is given twice (inputs {seen[where] + 1} and {k + 1}); drop the "
                "second, or weight the first with --weights"
            )
        seen[where] = k


def _screened(
    clients: list[Adapter], directories: list[Path], args: argparse.Namespace
) -> list[Adapter]:
    """The clients after flora.aggregation.screen (shapes from the first; bounds from the
    flags): a rejected one is an error naming it, a clipped one is said."""
    from flora.aggregation.screen import ScreenRules, Upload, screen

    if args.max_update_norm < 0 or (0 < args.norm_multiple < 1):
        raise FloraError("--max-update-norm must be >= 0 and --norm-multiple 0 or >= 1")
    shapes = {m: (f.out_features, f.in_features) for m, f in clients[0].items()}
    rules = ScreenRules(args.max_update_norm, args.norm_multiple, args.norm_action)
    uploads = [Upload(k, c, 1.0) for k, c in enumerate(clients)]
    result = screen(uploads, shapes, rules)
    if result.rejected:
        k = min(result.rejected)
        raise FloraError(
            f"client {k} ({directories[k]}): {result.rejected[k]}; drop it, fix "
            "it, or pass --norm-action clip for a norm"
        )
    for k, scale in sorted(result.clipped.items()):
        print(f"client {k} ({directories[k]}): update clipped by {scale:.3g} onto the bound")
    return [u.factors for u in result.accepted]


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from flora.adapters import load_peft_adapter, save_peft_adapter
    from flora.aggregation import aggregate, measure
    from flora.io import atomic_write, atomic_write_json

    directories = [Path(d) for d in args.adapters]
    _refuse_duplicates(directories)
    out = Path(args.out)
    if (out / ADAPTER_WEIGHTS).exists() and not args.force:
        raise FloraError(f"{out} already holds an adapter; pass --force or choose another --out")
    get_method(args.method)
    options = _options(args)
    loaded = [load_peft_adapter(d) for d in directories]
    clients = _screened([adapter.modules for adapter in loaded], directories, args)
    result = aggregate(args.method, clients, _parse_weights(args.weights, directories), **options)
    if not result.is_finite():
        raise FloraError("the aggregated update is not finite (the inputs overflow); check them")
    report = measure(clients, result.weights, result)

    template = {
        k: v for k, v in loaded[0].config.items() if k not in ("rank_pattern", "alpha_pattern")
    }
    save_peft_adapter(out, result.global_factors, template=template)
    if result.client_factors is not None:
        for k, download in enumerate(result.client_factors):
            save_peft_adapter(out / "clients" / f"client_{k}", download, template=template)
    if result.residual is not None:
        residual = {f"{m}.weight": t.contiguous() for m, t in result.residual.items()}
        atomic_write(out / "residual.safetensors", lambda tmp: save_file(residual, str(tmp)))
    summary = report.to_dict() | {"inputs": [str(d) for d in directories], "options": options}
    atomic_write_json(out / "report.json", summary)
    print(format_report(report, out))
    return 0


def format_report(report: AggregationReport, out: Path) -> str:
    """A short human summary of an aggregation."""
    lines = [f"method {report.method}: {len(report.weights)} clients -> {out}/"]
    lines.append(
        f"{'client':>6}  {'weight':>7}  {'ranks':>10}  {'bytes up':>12}  {'bytes down':>12}"
    )
    for k, weight in enumerate(report.weights):
        ranks = sorted(set(report.client_ranks[k].values()))
        rank_text = ",".join(str(r) for r in ranks)
        lines.append(
            f"{k:>6}  {weight:>7.4f}  {rank_text:>10}  {report.bytes_up[k]:>12,}  "
            f"{report.bytes_down[k]:>12,}"
        )
    global_ranks = sorted(set(report.global_ranks.values()))
    lines.append(f"global rank {','.join(map(str, global_ranks))}; noise {report.noise:.3e}")
    if report.client_noise is not None:
        per_client = ", ".join(f"{v:.3e}" for v in report.client_noise)
        lines.append(f"per-client download noise: {per_client}")
    lines.append(f"wrote {ADAPTER_WEIGHTS}, {ADAPTER_CONFIG}, report.json")
    return "\n".join(lines)
