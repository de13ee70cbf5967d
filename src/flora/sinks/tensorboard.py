"""TensorBoard event files of a run: ``output.report_to = ["tensorboard"]``.

Files: ``<run>/tensorboard/`` (``tensorboard --logdir runs`` shows every run of ``runs/``).
What: each row's numbers (flora.sinks.base.scalars: ``server/global_rank``,
``client/0/train_loss``, ``eval/heldout_loss``, ...) at step = its round; each client's local
loss curve as ``client/<k>/local_loss`` at step ``(round - 1) * steps + i`` (one curve per
client, its rounds end to end: the jumps at round starts are what aggregation did to it); the
run's settings and the server's sample answers as text.
Resume: the event files are a copy of metrics.jsonl, so they are written again from the rows
it kept (milliseconds) and go on from there: exactly its rows, none twice, where appending
would leave the interrupted round's points beside their repeats.
Values are stored as 32-bit floats, as TensorBoard's scalars are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from flora.sinks.base import Row, local_losses, scalars

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Rows to TensorBoard scalars; a resumed run's event files rewritten from ``kept``."""

    def __init__(self, run_dir: Path, settings: Row, kept: list[Row]) -> None:
        self.dir = run_dir / "tensorboard"
        shutil.rmtree(self.dir, ignore_errors=True)  # a copy of metrics.jsonl: rebuilt from it
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.writer.add_text("config", f"```\n{json.dumps(settings, indent=2)}\n```", 0)
        for row in kept:
            self._add(row)
        self.writer.flush()

    def _add(self, row: Row) -> None:
        round = int(row["round"])
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, round)
        for name, step, loss in local_losses(row):
            self.writer.add_scalar(name, loss, step)
        if row["kind"] == "eval" and row.get("samples") and "client" not in row:
            lines = [f"**{s['instruction']}**\n\n{s['answer']}" for s in row["samples"]]
            self.writer.add_text("eval/samples", "\n\n---\n\n".join(lines), round)

    def write(self, row: Row) -> None:
        self._add(row)
        self.writer.flush()  # one flush a row: a live TensorBoard sees each round as it ends

    def close(self) -> None:
        self.writer.close()
