"""A Weights & Biases run: ``output.report_to = ["wandb"]``.

Files: ``<run>/wandb/`` (``dir=`` the run directory). Online or offline as W&B's own variables
say: ``WANDB_MODE=offline`` writes ``<run>/wandb/offline-run-*/run-<id>.wandb`` for a later
``wandb sync``; online needs ``wandb login`` (or ``WANDB_API_KEY``) first. The project is
``WANDB_PROJECT`` (default "flora"), the run's name the run directory's, its config the run's
settings.
What: each row's numbers (flora.sinks.base.scalars) logged with ``round`` as their x-axis
(``define_metric``); each client's local loss curve as ``client/<k>/local_loss`` against its own
``client/<k>/local_step`` = ``(round - 1) * steps + i``: one curve per client, rounds end to end.
Resume: the W&B run id is kept in ``<run>/wandb/flora-run-id`` and the run resumed
(``resume="allow"``), so one flora run is one W&B run however often it is resumed (a run
that stopped before its first checkpoint starts again from nothing, in a new W&B run). The rows
metrics.jsonl kept reached W&B before, and are not sent again; the rows of the interrupted
round are, and any of them that reached W&B before the stop then appear twice at the same x
(their losses bitwise the same: a resumed run is bitwise the uninterrupted one).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import wandb

from flora.sinks.base import Row, local_losses, scalars

__all__ = ["WandbSink"]


class WandbSink:
    """Rows to one W&B run, resumed with the run directory."""

    def __init__(self, run_dir: Path, settings: Row, kept: list[Row]) -> None:
        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        saved = folder / "flora-run-id"
        if saved.is_file() and kept:  # resumed: go on in the same W&B run
            run_id = saved.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(6)  # W&B's own id form: letters and digits
            saved.write_text(run_id + "\n", encoding="utf-8")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "flora"),
            name=run_dir.name,
            dir=run_dir,
            id=run_id,
            resume="allow",
            config=settings,
            reinit="create_new",  # beside any run the caller has open
            settings=wandb.Settings(console="off"),  # flora's own lines stay on the terminal
        )
        self.defined: set[str] = set()

    def _define(self, name: str, step: str) -> None:
        if name not in self.defined:
            self.run.define_metric(name, step_metric=step)
            self.defined.add(name)

    def write(self, row: Row) -> None:
        values = scalars(row)
        for name in values:
            self._define(name, "round")
        if values:
            self.run.log({"round": int(row["round"]), **values})
        for name, step, loss in local_losses(row):
            step_name = name.removesuffix("local_loss") + "local_step"
            self._define(name, step_name)
            self.run.log({step_name: step, name: loss})

    def close(self) -> None:
        self.run.finish()
