"""``flora run --dry-run``: a run checked and described without training or writing anything.

It loads and validates the config, resolves it as a run would (target modules, rank profile,
device, precision), loads the model (for the target layers' shapes) and the data (the client
table and the per-category kept/dropped table), and counts the bytes every round sends up and
down per client. The bytes come from the server's own round protocol (flora.server.Server:
configure, screen, aggregate, complete) fed seeded random uploads of the assigned ranks in
place of training, so they are counted exactly as a run counts them (its client rows'
``bytes_up`` / ``bytes_down``), sampling and catch-up included, as long as every upload is
accepted. A download that depends on the uploaded values (florist's cut by spectral energy,
``catch_up = "svd"``'s numerical rank) is that of random, full-rank uploads: an upper bound.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from flora.client import ClientResult
from flora.config import RunConfig, config_toml
from flora.devices import (
    resolve_attention,
    resolve_base_dtype,
    resolve_device,
    resolve_precision,
)
from flora.engine import GlobalModel
from flora.errors import FloraError
from flora.factors import LoraFactors, lora_scaling
from flora.models import resolved_config
from flora.protocol import ClientTask
from flora.server import Server
from flora.sinks import check_trackers

__all__ = ["Traffic", "config_toml", "dry_run", "round_traffic"]


@dataclass(frozen=True)
class Traffic:
    """What one client sends and receives in one round, in bytes (as its metrics row says)."""

    round: int
    client: int
    rank: int
    up: int
    down: int


def dry_run(config: RunConfig, run_dir: Path) -> str:
    """The dry run's report: the resolved config, the model's target layers, the data tables
    and the bytes per round and client."""
    config = resolved_config(config)
    check_trackers(config.output.report_to)  # as the run would, before anything loads
    device = resolve_device(config.train.device, "train.device")
    precision = resolve_precision(config.train.precision, device, config.model.dtype)
    base = resolve_base_dtype(config.model.dtype, device, config.train.precision)
    targets = " (target modules fp32)" if base != "fp32" and config.model.exact_merge else ""
    kernels = resolve_attention(config.model.attention, device, base)
    tf32 = "on" if config.train.tf32 and device.type == "cuda" else "off"
    model = GlobalModel(config, "cpu")  # the shapes and the data; no training here
    sizes = [len(examples) for examples in model.data.clients]
    server = Server(config, model.shapes, sizes)  # checks every rank against its layers
    traffic = round_traffic(server, sizes)
    return "\n\n".join(
        [
            "# the resolved config (flora run --dry-run)\n" + config_toml(config).rstrip(),
            f"device {device}, precision {precision}, base {base}{targets}, attention "
            f"{kernels}, tf32 {tf32}\n{_layers(model.shapes)}",
            model.data.table,
            _traffic_table(traffic, config.federation.rounds),
            server.ledger.plan(sizes),
            f"dry run: nothing trained or written; without --dry-run the run goes to {run_dir}/",
        ]
    )


def round_traffic(server: Server, sizes: list[int], seed: int = 0) -> list[Traffic]:
    """Every round of ``server``'s run with seeded random uploads: who is sampled, and the
    bytes each sends up and receives down. ``server`` ends in the last round's state."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for t in range(1, server.config.federation.rounds + 1):
        tasks = server.configure(t)
        results = [_upload(server, task, sizes[task.client], generator) for task in tasks]
        server.complete(tasks, done=[r.client for r in results if r.error is None])
        outcome = server.aggregate(t, tasks, results)
        if outcome is None:
            raise FloraError(f"round {t} would fail: {server.shortfall}")
        ups = iter(outcome.report.bytes_up)
        for task, result in zip(tasks, results, strict=True):
            up = next(ups) if result.ok else 0
            rows.append(Traffic(t, task.client, task.rank, up, task.bytes_down))
    return rows


def _upload(
    server: Server, task: ClientTask, size: int, generator: torch.Generator
) -> ClientResult:
    """A client's round result with random factors of its rank (the parts its plan does not train
    as it was sent them), at its scaling; an empty partition trains nothing."""
    if size == 0:
        return ClientResult(task.client, task.round, error="its partition holds no examples")
    scaling = lora_scaling(task.alpha, task.rank, server.config.lora.use_rslora)
    factors = {}
    for module, (out_features, in_features) in sorted(server.shapes.items()):
        A = torch.randn(task.rank, in_features, generator=generator) / in_features**0.5
        B = torch.randn(out_features, task.rank, generator=generator) * 1e-2
        if task.init is not None:  # the parts it does not train come back as sent
            sent = task.init[module].with_scaling(scaling)
            A = A if "A" in task.changes else sent.A
            B = B if "B" in task.changes else sent.B
        factors[module] = LoraFactors(A, B, scaling)
    return ClientResult(task.client, task.round, factors=factors, examples=size)


def _layers(shapes: dict[str, tuple[int, int]]) -> str:
    """The target layers, counted by leaf name and shape."""
    kinds = Counter((name.rsplit(".", 1)[-1], shape) for name, shape in shapes.items())
    parts = [f"{n} x {leaf} ({out}x{inp})" for (leaf, (out, inp)), n in sorted(kinds.items())]
    return f"{len(shapes)} target layers: {', '.join(parts)}"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _traffic_table(traffic: list[Traffic], rounds: int) -> str:
    """Rows per round and client; consecutive rounds with the same rows share one block."""
    by_round: dict[int, list[tuple[int, int, int, int]]] = {}
    for row in traffic:
        by_round.setdefault(row.round, []).append((row.client, row.rank, row.up, row.down))
    lines = [
        "bytes per client and round, as the run's client rows count them (seeded random "
        "uploads\nof the assigned ranks stand in for training, all of them accepted)",
        f"{'round':<10} {'client':>6} {'rank':>5} {'up':>11} {'down':>11}",
    ]
    t = 1
    while t <= rounds:
        last = t
        while last + 1 <= rounds and by_round.get(last + 1) == by_round.get(t):
            last += 1
        label = str(t) if last == t else f"{t}-{last}"
        for client, rank, up, down in by_round.get(t, []):
            lines.append(f"{label:<10} {client:>6} {rank:>5} {_size(up):>11} {_size(down):>11}")
        t = last + 1
    up, down = sum(r.up for r in traffic), sum(r.down for r in traffic)
    lines.append(f"{f'all {rounds} rounds':<23} {_size(up):>11} {_size(down):>11}")
    return "\n".join(lines)
