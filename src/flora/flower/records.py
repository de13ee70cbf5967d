"""What travels between the ServerApp and the ClientApps, as Flower records, and back.

Server to client (train and evaluate messages):
  ``task``      ConfigRecord: the ClientTask's scalars, the run config as JSON, and ``since`` /
                ``through``, the merged updates the client's base holds before / after catch-up
  ``catch-up``  ArrayRecord: the merged updates it missed, ``<i>/<module>/A|B|R``
  ``init``      ArrayRecord: its starting LoRA, for methods with a global LoRA (train)
  ``lora``      ArrayRecord: the global LoRA to evaluate (evaluate, methods that keep one)
Client to server:
  ``factors``   ArrayRecord ``<module>/A`` (r, in) and ``<module>/B`` (out, r), fp32, bitwise
  ``metrics``   MetricRecord: partition, num-examples, tokens, steps, train-loss, seconds,
                scaling, process-age, prepare-seconds, received-at, replied-at (train);
                partition, heldout-loss (evaluate)
  ``samples``   ConfigRecord: instructions and answers (evaluate, when eval.samples > 0)
Flower splits large arrays into 5 MiB chunks by itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, MetricRecordValues, RecordDict

from flora.adapters import Adapter, LoraFactors
from flora.config import RunConfig, config_from_dict, config_to_dict
from flora.errors import FloraError
from flora.protocol import RoundUpdate
from flora.server import ClientTask
from flora.training import LocalResult

__all__ = [
    "Evaluation",
    "TaskInfo",
    "Upload",
    "adapter_from_record",
    "adapter_to_record",
    "config_json",
    "evaluation_from_content",
    "evaluation_to_content",
    "node_from_content",
    "partition_of",
    "task_from_record",
    "task_to_record",
    "updates_from_record",
    "updates_to_record",
    "upload_from_content",
    "upload_to_content",
]


def _number(record: ConfigRecord | MetricRecord, key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FloraError(
            f"record field '{key}' is {value!r}, expected a number; run the same flora version "
            "on the server and every node"
        )
    return float(value)


def _strings(record: ConfigRecord, key: str) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FloraError(f"record field '{key}' is {value!r}, expected a list of strings")
    return [str(v) for v in value]


# --- tensors ----------------------------------------------------------------------------------


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


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict()) if len(record) else {}


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
    tensors = _tensors(record)
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


# --- the task -------------------------------------------------------------------------------


def config_json(config: RunConfig) -> str:
    """The run config as the JSON string that travels in every task."""
    return json.dumps(config_to_dict(config), sort_keys=True)


@dataclass
class TaskInfo:
    """A task as the ClientApp reads it: the ClientTask, the run config, the catch-up range."""

    task: ClientTask  # catch_up and init still empty: they come from the ArrayRecords
    config: RunConfig
    since: int  # merged updates the client's base held before this catch-up
    through: int  # ... and holds after it
    catch_up_rounds: list[int]


def task_to_record(
    task: ClientTask, config_json: str, since: int, through: int, run_key: str = ""
) -> ConfigRecord:
    """The ConfigRecord of one task; ``config_json`` is the run's resolved config, ``run_key``
    names the node state of the flora run (kept across a resume)."""
    return ConfigRecord(
        {
            "run-key": run_key,
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
    config = config_from_dict(json.loads(str(record.get("config", "{}"))))
    task = ClientTask(
        client=int(_number(record, "partition")),
        round=int(_number(record, "round")),
        rank=int(_number(record, "rank")),
        alpha=_number(record, "alpha"),
        seed=int(_number(record, "seed")),
        freeze_A=bool(record.get("freeze-a", False)),
        bytes_down=int(_number(record, "bytes-down")),
    )
    rounds = [int(r) for r in str(record.get("catch-up-rounds", "")).split(",") if r]
    since, through = int(_number(record, "since")), int(_number(record, "through"))
    return TaskInfo(task, config, since, through, rounds)


# --- the replies ----------------------------------------------------------------------------


_TIMING = ("process-age", "prepare-seconds", "received-at", "replied-at")


@dataclass
class Upload:
    """One client's reply to a train message."""

    partition: int
    factors: Adapter  # at the client's scaling
    examples: int
    tokens: int
    steps: int
    train_loss: float
    seconds: float  # in train_client
    # process-age (at the message), prepare-seconds (until training), received-at and
    # replied-at (Unix time of the message's start and end on the node)
    timing: dict[str, float]


def upload_to_content(
    partition: int, result: LocalResult, timing: dict[str, float] | None = None
) -> RecordDict:
    scalings = {f.scaling for f in result.factors.values()}
    if len(scalings) != 1:
        raise FloraError(f"client {partition}: modules trained at scalings {sorted(scalings)}")
    metrics: dict[str, MetricRecordValues] = {
        "partition": partition,
        "num-examples": result.examples,
        "tokens": result.tokens,
        "steps": result.steps,
        "train-loss": result.train_loss,
        "seconds": result.seconds,
        "scaling": scalings.pop(),
        **(timing or {}),
    }
    factors = ArrayRecord(adapter_to_record(result.factors))
    return RecordDict({"factors": factors, "metrics": MetricRecord(metrics)})


def upload_from_content(content: RecordDict) -> Upload:
    metrics = content.metric_records["metrics"]
    tensors = _tensors(content.array_records["factors"])
    return Upload(
        partition=int(_number(metrics, "partition")),
        factors=adapter_from_record(tensors, scaling=_number(metrics, "scaling")),
        examples=int(_number(metrics, "num-examples")),
        tokens=int(_number(metrics, "tokens")),
        steps=int(_number(metrics, "steps")),
        train_loss=_number(metrics, "train-loss"),
        seconds=_number(metrics, "seconds"),
        timing={k: _number(metrics, k) for k in _TIMING if k in metrics},
    )


@dataclass
class Evaluation:
    """One client's reply to an evaluate message."""

    partition: int
    loss: float
    samples: list[dict[str, str]]  # instruction, answer


def evaluation_to_content(evaluation: Evaluation) -> RecordDict:
    metrics: dict[str, MetricRecordValues] = {
        "partition": evaluation.partition,
        "heldout-loss": evaluation.loss,
    }
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if evaluation.samples:
        content["samples"] = ConfigRecord(
            {
                "instructions": [s["instruction"] for s in evaluation.samples],
                "answers": [s["answer"] for s in evaluation.samples],
            }
        )
    return content


def evaluation_from_content(content: RecordDict) -> Evaluation:
    metrics = content.metric_records["metrics"]
    samples = []
    if "samples" in content.config_records:
        record = content.config_records["samples"]
        pairs = zip(_strings(record, "instructions"), _strings(record, "answers"), strict=True)
        samples = [{"instruction": i, "answer": a} for i, a in pairs]
    return Evaluation(int(_number(metrics, "partition")), _number(metrics, "heldout-loss"), samples)


def partition_of(content: RecordDict) -> int:
    """The partition a train or evaluate reply comes from."""
    return int(_number(content.metric_records["metrics"], "partition"))


def node_from_content(content: RecordDict) -> tuple[int, int]:
    """(partition-id, num-partitions) from a node's reply to the ServerApp's query."""
    record = content.config_records["node"]
    return int(_number(record, "partition-id")), int(_number(record, "num-partitions"))
