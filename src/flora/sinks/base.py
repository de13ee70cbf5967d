"""What every metric sink is, and what a metrics row becomes in a tracker.

A sink takes the run's rows one at a time, in the order metrics.jsonl holds them, and is closed
at the end (torchtune's ``MetricLoggerInterface``: log, close). The trackers log numbers against
a step, so a row becomes named numbers at its round (:func:`scalars`), and a client row's
per-step losses become that client's local loss curve (:func:`local_losses`). Text (sample
answers, errors), lists and flags stay in metrics.jsonl only. Imports nothing heavy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Row", "Sink", "SinkFactory", "local_losses", "scalars"]

Row = dict[str, Any]


class Sink(Protocol):
    """Where the rows of a run go: ``write`` each row as it is written, ``close`` at the end."""

    def write(self, row: Row) -> None: ...

    def close(self) -> None: ...


SinkFactory = Callable[[Path, Row, list[Row]], Sink]
"""``(run_dir, settings, kept) -> Sink``: ``settings`` is config.json's settings (nested dicts),
``kept`` the rows metrics.jsonl already holds when the sink opens (none for a new run; a resumed
run's rows up to its checkpoint), which the tracker has had from the earlier process."""

_WHERE = ("kind", "round", "client")  # where a row belongs, not what it measured


def _number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _leaves(prefix: str, value: object, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _leaves(f"{prefix}/{key}", inner, out)
    elif _number(value):
        out[prefix] = float(value)  # type: ignore[arg-type]


def scalars(row: Row) -> dict[str, float]:
    """The row's numbers, named ``<kind>/<field>`` (``<kind>/<client>/<field>`` in a row of
    one client), nested tables flattened (``eval/per_category/open_qa``). The tracker logs them
    at step ``row["round"]``. Flags, text, lists and non-finite values are left out."""
    prefix = str(row["kind"]) if "client" not in row else f"{row['kind']}/{row['client']}"
    out: dict[str, float] = {}
    for key, value in row.items():
        if key not in _WHERE:
            _leaves(f"{prefix}/{key}", value, out)
    return out


def local_losses(row: Row) -> list[tuple[str, int, float]]:
    """A client row's per-step training losses as ``(name, step, loss)``: ``client/<k>/
    local_loss`` at step ``(round - 1) * n + i`` for the i-th of the round's n steps.

    One curve per client, its rounds end to end: within a round it shows the client fitting
    its own data, and the jump at each round's start shows what aggregation did to its loss
    (the client drift a federated run is about). step / n is the round, so the curves of
    clients with the same step count line up with each other and with the round metrics.
    """
    curve = row.get("loss_curve") or []
    if row.get("kind") != "client" or not curve:
        return []
    name, start = f"client/{row['client']}/local_loss", (int(row["round"]) - 1) * len(curve)
    return [(name, start + i, float(v)) for i, v in enumerate(curve) if _number(v)]
