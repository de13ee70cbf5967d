"""An MLflow run: ``output.report_to = ["mlflow"]``.

Files: ``<run>/mlflow/mlflow.db``, an SQLite tracking store (MLflow's file store is in
maintenance mode and refused by default since MLflow 3), unless ``MLFLOW_TRACKING_URI`` names
another store or a server. View it with ``mlflow ui --backend-store-uri
sqlite:///<run>/mlflow/mlflow.db`` (the full ``mlflow`` package). The experiment is
``MLFLOW_EXPERIMENT_NAME`` (default "flora"), the run's name the run directory's, its params the
run's settings, flattened (``federation.method``, ...), and its ``flora.run_dir`` tag where the
run directory is.
What: each row's numbers (flora.sinks.base.scalars) at step = its round; each client's local
loss curve as ``client/<k>/local_loss`` at step ``(round - 1) * steps + i`` (one curve per
client, rounds end to end). Metric names keep MLflow's characters; any other becomes ``_``.
Resume: the MLflow run id is kept in ``<run>/mlflow/run-id`` and that run continues (status
RUNNING again), so one flora run is one MLflow run (a run that stopped before its first
checkpoint starts again from nothing, in a new MLflow run). The rows metrics.jsonl kept were logged
before and are not logged again; the interrupted round's rows are, and any of them logged
before the stop then hold two values at the same step (their losses bitwise the same). Params
are logged when the MLflow run is created: MLflow refuses to change one, so an extended run's
``federation.rounds`` param keeps its first value.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flora.sinks.base import Row, local_losses, scalars

__all__ = ["MlflowSink"]

_BATCH = 1000  # MLflow's most metrics in one log_batch
_PARAMS = 100  # ... and params


def _params(settings: Row, prefix: str = "") -> dict[str, str]:
    """``settings`` as MLflow params: dotted names, values as text."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out |= _params(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]
    return out


def _name(name: str) -> str:
    return re.sub(r"[^\w\-./ :]", "_", name)


class MlflowSink:
    """Rows to one MLflow run, continued when the run directory is resumed."""

    def __init__(self, run_dir: Path, settings: Row, kept: list[Row]) -> None:
        folder = run_dir / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{(folder / 'mlflow.db').resolve()}" if local else None
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # its set-up lines
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self._run(run_dir, folder, settings, local, resumed=bool(kept))

    def _run(self, run_dir: Path, folder: Path, settings: Row, local: bool, resumed: bool) -> str:
        """The saved run, where a resume keeps rows; else a new one."""
        saved = folder / "run-id"
        if saved.is_file() and resumed:
            run_id = saved.read_text(encoding="utf-8").strip()
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException:  # not in this tracking store: start another
                pass
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "flora")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = (folder / "artifacts").resolve().as_uri() if local else None
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        tags = {"flora.run_dir": str(run_dir.resolve())}
        run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        params = [Param(k, v) for k, v in _params(settings).items()]
        for start in range(0, len(params), _PARAMS):
            self.client.log_batch(run_id, params=params[start : start + _PARAMS])
        saved.write_text(run_id + "\n", encoding="utf-8")
        return run_id

    def write(self, row: Row) -> None:
        now, round = int(time.time() * 1000), int(row["round"])
        metrics: list[Any] = [Metric(_name(k), v, now, round) for k, v in scalars(row).items()]
        metrics += [Metric(_name(k), v, now, step) for k, step, v in local_losses(row)]
        for start in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _BATCH])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
