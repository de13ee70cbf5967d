"""Metric sinks: where a run's rows go besides metrics.jsonl, chosen by ``output.report_to``.

metrics.jsonl (:mod:`flora.sinks.jsonl`) is always written, first, and stays the record of
truth: a resume truncates it to the checkpoint's round, and ``flora compare`` and the tests read
it. The trackers below get every row after it (:mod:`flora.sinks.fanout`); a tracker that fails
is dropped with one warning line and the run goes on.

- ``tensorboard`` (:mod:`flora.sinks.tensorboard`): event files in ``<run>/tensorboard/``;
- ``wandb`` (:mod:`flora.sinks.wandb`): a W&B run in ``<run>/wandb/``, offline or online as
  ``WANDB_MODE`` says;
- ``mlflow`` (:mod:`flora.sinks.mlflow`): an MLflow run in ``<run>/mlflow/mlflow.db``, or on the
  server ``MLFLOW_TRACKING_URI`` names.

Each is an extra of the same name (``pip install 'flora-lora[wandb]'``); each module's
docstring says what it logs and what a resume does to it.

A new sink is one module here with a class that has ``write(row)`` and ``close()``
(:class:`flora.sinks.base.Sink`), plus its entry in :data:`SINKS`. The table imports the
trackers lazily, so the config and ``flora --help`` load none of them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from flora.errors import FloraError
from flora.sinks.base import Row, Sink, SinkFactory, local_losses, scalars

__all__ = [
    "SINKS",
    "Row",
    "Sink",
    "SinkFactory",
    "Tracker",
    "check_trackers",
    "local_losses",
    "scalars",
]


@dataclass(frozen=True)
class Tracker:
    """One ``output.report_to`` name: how its sink opens and what it needs installed."""

    open: SinkFactory
    module: str = ""  # the package it imports, checked before the run starts ("": none)
    extra: str = ""  # the flora-lora extra that installs it


def _tensorboard(run_dir: Path, settings: Row, kept: list[Row]) -> Sink:
    from flora.sinks.tensorboard import TensorBoardSink

    return TensorBoardSink(run_dir, settings, kept)


def _wandb(run_dir: Path, settings: Row, kept: list[Row]) -> Sink:
    from flora.sinks.wandb import WandbSink

    return WandbSink(run_dir, settings, kept)


def _mlflow(run_dir: Path, settings: Row, kept: list[Row]) -> Sink:
    from flora.sinks.mlflow import MlflowSink

    return MlflowSink(run_dir, settings, kept)


SINKS: dict[str, Tracker] = {
    "tensorboard": Tracker(_tensorboard, module="tensorboard", extra="tensorboard"),
    "wandb": Tracker(_wandb, module="wandb", extra="wandb"),
    "mlflow": Tracker(_mlflow, module="mlflow", extra="mlflow"),
}


def check_trackers(names: list[str]) -> None:
    """Each of ``names`` (``output.report_to``) known and installed, or one FloraError naming
    the field and the fix. Looks the packages up without importing them."""
    for name in names:
        if name not in SINKS:
            raise FloraError(
                f"output.report_to: unknown tracker {name!r}; choose from "
                f"{', '.join(sorted(SINKS))} (metrics.jsonl is always written)"
            )
        tracker = SINKS[name]
        if tracker.module and importlib.util.find_spec(tracker.module) is None:
            raise FloraError(
                f"output.report_to names {name!r}, but {tracker.module} is not installed: "
                f"pip install 'flora-lora[{tracker.extra}]', or leave {name!r} out"
            )
