"""flora's objects as Flower records, and back: what travels in the ServerApp/ClientApp messages.

A train message holds three records: ``task`` (a ConfigRecord: the ClientTask's scalars, the
run's resolved config as JSON, and ``since``/``through``, the history counts before and after
the catch-up), ``catch-up`` (an ArrayRecord: the merged updates the client missed) and ``init``
(an ArrayRecord: the starting global LoRA, for methods that keep one). The reply holds
``factors`` (ArrayRecord) and ``metrics`` (MetricRecord). Tensors travel bitwise (fp32 bytes);
Flower splits large arrays into 5 MiB chunks by itself.

Array keys: ``<module>/A`` (r, in), ``<module>/B`` (out, r); catch-up entries are prefixed with
their position ``<i>/`` and may carry ``<i>/<module>/R`` (out, in), fedex-lora's residual.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord

from flora.adapters import Adapter, LoraFactors
from flora.config import RunConfig, config_from_dict, config_to_dict
from flora.errors import FloraError
from flora.protocol import RoundUpdate
from flora.server import ClientTask

__all__ = [
    "TaskInfo",
    "config_json",
    "adapter_from_record",
    "adapter_to_record",
    "task_from_record",
    "task_to_record",
    "updates_from_record",
    "updates_to_record",
]


def adapter_to_record(adapter: Adapter, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{prefix}<module>/A`` and ``/B`` tensors of ``adapter`` (scalings travel separately)."""
    out: dict[str, torch.Tensor] = {}
    for module, factors in adapter.items():
        out[f"{prefix}{module}/A"] = factors.A.detach().contiguous()
        out[f"{prefix}{module}/B"] = factors.B.detach().contiguous()
    return out


def adapter_from_record(
    tensors: dict[str, torch.Tensor], prefix: str = "", scaling: float = 1.0
) -> Adapter:
    """The adapter stored under ``prefix`` in ``tensors``, every module at ``scaling``."""
    modules = sorted(
        {k[len(prefix) : -2] for k in tensors if k.startswith(prefix) and k[-2:] in ("/A", "/B")}
    )
    if not modules:
        raise FloraError(f"message holds no LoRA factors under '{prefix}'; check the sender")
    return {
        m: LoraFactors(tensors[f"{prefix}{m}/A"], tensors[f"{prefix}{m}/B"], scaling)
        for m in modules
    }


def updates_to_record(updates: Sequence[RoundUpdate]) -> ArrayRecord:
    """Merged round updates (factors at scaling 1, optional residuals), in order."""
    tensors: dict[str, torch.Tensor] = {}
    for i, update in enumerate(updates):
        tensors |= adapter_to_record(update.factors, f"{i}/")
        for module, residual in (update.residual or {}).items():
            tensors[f"{i}/{module}/R"] = residual.contiguous()
    return ArrayRecord(tensors) if tensors else ArrayRecord()


def updates_from_record(record: ArrayRecord, rounds: Sequence[int]) -> list[RoundUpdate]:
    """The updates :func:`updates_to_record` packed; ``rounds`` gives each one's round."""
    tensors = dict(record.to_torch_state_dict()) if len(record) else {}
    updates = []
    for i, round in enumerate(rounds):
        prefix = f"{i}/"
        residual = {
            k[len(prefix) : -2]: v
            for k, v in tensors.items()
            if k.startswith(prefix) and k.endswith("/R")
        }
        factors = adapter_from_record(tensors, prefix)
        updates.append(RoundUpdate(int(round), factors, residual or None))
    return updates


@dataclass
class TaskInfo:
    """A task as the ClientApp reads it: the ClientTask, the run config, the catch-up range."""

    task: ClientTask  # catch_up and init still empty: they come from the ArrayRecords
    config: RunConfig
    since: int  # merged updates the client's base held before this catch-up
    through: int  # ... and holds after it
    catch_up_rounds: list[int]


def task_to_record(task: ClientTask, config_json: str, since: int, through: int) -> ConfigRecord:
    """The ConfigRecord of one task; ``config_json`` is the run's resolved config."""
    return ConfigRecord(
        {
            "partition": task.client,
            "round": task.round,
            "rank": task.rank,
            "alpha": float(task.alpha),
            "seed": task.seed,
            "freeze-a": task.freeze_A,
            "since": since,
            "through": through,
            "catch-up-rounds": ",".join(str(u.round) for u in task.catch_up),
            "bytes-down": task.bytes_down,
            "config": config_json,
        }
    )


def task_from_record(record: ConfigRecord) -> TaskInfo:
    """Read back :func:`task_to_record`; the catch-up and init come from the ArrayRecords."""
    try:
        config = config_from_dict(json.loads(str(record["config"])))
        rounds = [int(r) for r in str(record["catch-up-rounds"]).split(",") if r]
        task = ClientTask(
            client=int(record["partition"]),  # type: ignore[arg-type]
            round=int(record["round"]),  # type: ignore[arg-type]
            rank=int(record["rank"]),  # type: ignore[arg-type]
            alpha=float(record["alpha"]),  # type: ignore[arg-type]
            seed=int(record["seed"]),  # type: ignore[arg-type]
            freeze_A=bool(record["freeze-a"]),
            bytes_down=int(record["bytes-down"]),  # type: ignore[arg-type]
        )
        since, through = int(record["since"]), int(record["through"])  # type: ignore[arg-type]
    except KeyError as error:
        raise FloraError(
            f"task record lacks {error}; run the same flora version on server and clients"
        ) from None
    return TaskInfo(task, config, since, through, rounds)


def config_json(config: RunConfig) -> str:
    """The run config as the JSON string that travels in every task."""
    return json.dumps(config_to_dict(config), sort_keys=True)
