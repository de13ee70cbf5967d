"""What travels between the ServerApp and the ClientApps, as Flower records, and back.

Server to client (train and evaluate messages):
  ``task``      ConfigRecord: the ClientTask's scalars (``since`` / ``through``: the merged
                updates the client's base holds before / after catch-up; ``trains``: the parts
                its method's plan trains) and the run config
  ``catch-up``  ArrayRecord: the merged updates it missed, ``<i>/`` + RoundUpdate.to_tensors
  ``init``      ArrayRecord: its starting LoRA, where its method's plan gives one (train)
  ``folded``    ArrayRecord: a LoRA its frozen weights hold while it trains, where the plan
                gives one (train; Fed-PLoRA's untrained components)
  ``core``      ArrayRecord: module -> the r x r core it trains between a frozen A and B, where
                the plan trains {"R"} (train; Fed-SB)
  ``lora``      ArrayRecord: the global LoRA to evaluate (evaluate, methods that keep one)
Client to server (one ClientResult):
  ``factors``   ArrayRecord: the trained factors, flora.factors' codec, fp32, bitwise (train)
  ``metrics``   MetricRecord: partition, round, num-examples, tokens, steps, train-loss, seconds,
                sync-seconds, scaling, heldout-loss (evaluate), loss-curve (each local
                step's loss, a list of floats; empty when no step ran), and the node's timings
  ``samples``   ConfigRecord: instructions and answers (evaluate, when eval.samples > 0)
Tensors use flora.factors' one codec (``<module>.lora_A.weight``) under a record prefix, and
every ArrayRecord holds them packed (:func:`pack`): one uint8 array, their safetensors
serialization, bitwise. Flower sends each array of a record as an object of its own, pulled
with a request of its own on every hop (ServerApp, SuperLink, SuperNode, ClientApp and back):
a SmolLM2 adapter of 120 tensors is 243 objects unpacked, 5 packed (Flower splits an array into
5 MiB chunks by itself), which cut seconds from every round (bench/flower_overhead.py). A
packed record from a client is read through safetensors (no pickle), its header checked
against the elements the task allows before any tensor is made.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, MetricRecordValues, RecordDict
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from flora.aggregation.lifecycle import check_parts
from flora.client import ClientResult
from flora.config import RunConfig, config_from_dict, config_to_dict
from flora.errors import FloraError
from flora.factors import Adapter, adapter_from_tensors, adapter_to_tensors
from flora.protocol import ClientTask, RoundUpdate

__all__ = [
    "PACKED",
    "TaskInfo",
    "adapter_from_record",
    "adapter_to_record",
    "config_json",
    "node_from_content",
    "pack",
    "partition_of",
    "result_from_content",
    "result_to_content",
    "task_from_record",
    "task_to_record",
    "unpack",
    "updates_from_record",
    "updates_to_record",
]


def _number(record: ConfigRecord | MetricRecord, key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FloraError(
            f"record field '{key}' is {value!r}, expected a number; run the same flora version "
            "on the server and every node"
        )
    return float(value)


def _floats(record: MetricRecord, key: str) -> list[float]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, float) for v in value):
        raise FloraError(f"record field '{key}' is {value!r}, expected a list of floats")
    return [float(v) for v in value]


def _strings(record: ConfigRecord, key: str) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FloraError(f"record field '{key}' is {value!r}, expected a list of strings")
    return [str(v) for v in value]


# --- tensors ----------------------------------------------------------------------------------


def adapter_to_record(adapter: Adapter, prefix: str = "") -> dict[str, torch.Tensor]:
    """``adapter``'s tensors under ``prefix`` (scalings travel separately)."""
    return adapter_to_tensors(adapter, prefix)


def adapter_from_record(
    tensors: dict[str, torch.Tensor], prefix: str = "", scaling: float = 1.0
) -> Adapter:
    """The adapter stored under ``prefix`` in ``tensors``, every module at ``scaling``."""
    return adapter_from_tensors(tensors, prefix, scaling, source="message")


PACKED = "safetensors"  # the one array of a packed record
_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


def pack(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """``tensors`` as one ArrayRecord of one uint8 array: their safetensors bytes."""
    if not tensors:
        return ArrayRecord()
    data = save_safetensors({k: v.detach().contiguous() for k, v in tensors.items()})
    return ArrayRecord({PACKED: Array(np.frombuffer(data, dtype=np.uint8))})


def unpack(record: ArrayRecord, limit: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors :func:`pack` packed. A record of another shape, a header that does not
    parse, a non-numeric dtype or (with ``limit``) more than ``limit`` elements together is
    refused (FloraError) before any tensor is made; safetensors checks every tensor's bytes."""
    if not len(record):
        return {}
    if list(record.keys()) != [PACKED]:
        raise FloraError(f"its arrays are not one packed '{PACKED}' array: {list(record)[:3]}")
    data = _payload(PACKED, record[PACKED])  # the bytes after a checked uint8 npy header
    try:
        size = int.from_bytes(data[:8], "little")
        if not 0 < size <= len(data) - 8 or size > 1 << 26:
            raise ValueError(f"a header of {size} bytes in {len(data)}")
        header = json.loads(bytes(data[8 : 8 + size]))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        total = 0
        for key, entry in entries.items():
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"tensor '{key}' is of dtype {entry['dtype']}")
            total += math.prod(int(n) for n in entry["shape"])
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise FloraError(f"its packed tensors have no readable header ({error})") from None
    if limit is not None and total > limit:
        raise FloraError(f"its arrays hold more than the {limit} elements its task allows")
    try:
        return load_safetensors(bytes(data))  # the one copy of the payload
    except SafetensorError as error:
        raise FloraError(f"its packed tensors do not read ({error})") from None


def _payload(key: str, array: Any) -> memoryview:
    """An array's bytes after its npy header, a view (no copy), once the header is checked: a
    1-D uint8 array whose bytes match its shape."""
    if getattr(array, "stype", None) != "numpy.ndarray" or not isinstance(array.data, bytes):
        raise FloraError(f"array '{key}' is not a numpy array")
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(stream, max_header_size=1024)
    except (ValueError, TypeError, SyntaxError) as error:
        raise FloraError(f"array '{key}' has no readable npy header ({error})") from error
    if dtype != np.uint8 or len(shape) != 1:
        raise FloraError(f"array '{key}' is of dtype {dtype} and shape {shape}, not bytes")
    if shape[0] != len(array.data) - stream.tell():
        raise FloraError(f"array '{key}' claims shape {shape} but carries other bytes")
    return memoryview(array.data)[stream.tell() :]


def updates_to_record(updates: Sequence[RoundUpdate]) -> ArrayRecord:
    """Merged round updates (factors at scaling 1, optional residuals), in order."""
    tensors: dict[str, torch.Tensor] = {}
    for i, update in enumerate(updates):
        tensors |= update.to_tensors(f"{i}/")
    return pack(tensors)


def updates_from_record(record: ArrayRecord, rounds: Sequence[int]) -> list[RoundUpdate]:
    """The updates :func:`updates_to_record` packed; ``rounds`` gives each one's round."""
    tensors = unpack(record)
    updates = []
    for i, round in enumerate(rounds):
        prefix = f"{i}/"
        mine = {k: v for k, v in tensors.items() if k.startswith(prefix)}
        updates.append(RoundUpdate.from_tensors(mine, int(round), prefix))
    return updates


# --- the task -------------------------------------------------------------------------------


def config_json(config: RunConfig) -> str:
    """The run config as the JSON string that travels in every task."""
    return json.dumps(config_to_dict(config), sort_keys=True)


@dataclass
class TaskInfo:
    """A task as the ClientApp reads it: the ClientTask and the run config."""

    task: ClientTask  # catch_up and init still empty: they come from the ArrayRecords
    config: RunConfig
    catch_up_rounds: list[int]

    @property
    def since(self) -> int:
        return self.task.since

    @property
    def through(self) -> int:
        return self.task.through


def task_to_record(task: ClientTask, config_json: str, run_key: str = "") -> ConfigRecord:
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
            "trains": sorted(task.trains),
            "fold": task.fold,
            "since": task.since,
            "through": task.through,
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
        trains=check_parts(_strings(record, "trains"), "the task's trains"),
        fold=record.get("fold", False) is True,
        since=int(_number(record, "since")),
        through=int(_number(record, "through")),
        bytes_down=int(_number(record, "bytes-down")),
    )
    rounds = [int(r) for r in str(record.get("catch-up-rounds", "")).split(",") if r]
    return TaskInfo(task, config, rounds)


# --- the replies ----------------------------------------------------------------------------


_SCALARS = ("tokens", "steps", "seconds", "sync-seconds")


def result_to_content(result: ClientResult) -> RecordDict:
    """A client's reply: its factors (train), its metrics and sample answers (evaluate)."""
    if result.error is not None:
        raise FloraError(result.error)  # Flower's error reply carries it to the server
    metrics: dict[str, MetricRecordValues] = {
        "partition": result.client,
        "round": result.round,
        "num-examples": result.examples,
        "tokens": result.tokens,
        "steps": result.steps,
        "train-loss": result.train_loss,
        "seconds": result.seconds,
        "sync-seconds": result.sync_seconds,
        "loss-curve": [float(v) for v in result.loss_curve],
        **result.timing,
    }
    for key, value in (
        ("peak-rss-mib", result.peak_rss_mib),
        ("peak-cuda-mib", result.peak_cuda_mib),
    ):
        if value is not None:
            metrics[key] = value
    content = RecordDict({})
    if result.factors is not None:
        scalings = {f.scaling for f in result.factors.values()}
        if len(scalings) != 1:
            raise FloraError(
                f"client {result.client}: modules trained at scalings {sorted(scalings)}"
            )
        metrics["scaling"] = scalings.pop()
        content["factors"] = pack(adapter_to_record(result.factors))
    if result.heldout_loss is not None:
        metrics["heldout-loss"] = result.heldout_loss
    content["metrics"] = MetricRecord(metrics)
    if result.samples:
        content["samples"] = ConfigRecord(
            {
                "instructions": [s["instruction"] for s in result.samples],
                "answers": [s["answer"] for s in result.samples],
            }
        )
    return content


def result_from_content(content: RecordDict, limit: int | None = None) -> ClientResult:
    """Read back :func:`result_to_content`; a malformed reply raises FloraError, and so do
    factors of more than ``limit`` elements (checked before any is decoded)."""
    metrics = content.metric_records["metrics"]
    result = ClientResult(int(_number(metrics, "partition")), int(_number(metrics, "round")))
    result.examples = int(_number(metrics, "num-examples"))
    result.train_loss = _number(metrics, "train-loss")
    result.tokens = int(_number(metrics, "tokens"))
    result.steps = int(_number(metrics, "steps"))
    result.seconds = _number(metrics, "seconds")
    result.sync_seconds = _number(metrics, "sync-seconds")
    if "peak-rss-mib" in metrics:
        result.peak_rss_mib = _number(metrics, "peak-rss-mib")
    if "peak-cuda-mib" in metrics:
        result.peak_cuda_mib = _number(metrics, "peak-cuda-mib")
    if "loss-curve" in metrics:
        result.loss_curve = _floats(metrics, "loss-curve")
    known = {
        "partition",
        "round",
        "num-examples",
        "train-loss",
        "scaling",
        "heldout-loss",
        "peak-rss-mib",
        "peak-cuda-mib",
        "loss-curve",
        *_SCALARS,
    }
    result.timing = {k: _number(metrics, k) for k in metrics if k not in known}
    if "factors" in content.array_records:
        tensors = unpack(content.array_records["factors"], limit)
        result.factors = adapter_from_record(tensors, scaling=_number(metrics, "scaling"))
    if "heldout-loss" in metrics:
        result.heldout_loss = _number(metrics, "heldout-loss")
    if "samples" in content.config_records:
        record = content.config_records["samples"]
        pairs = zip(_strings(record, "instructions"), _strings(record, "answers"), strict=True)
        result.samples = [{"instruction": i, "answer": a} for i, a in pairs]
    return result


def partition_of(content: RecordDict) -> int:
    """The partition a train or evaluate reply comes from."""
    return int(_number(content.metric_records["metrics"], "partition"))


def node_from_content(content: RecordDict) -> tuple[int, int]:
    """(partition-id, num-partitions) from a node's reply to the ServerApp's query."""
    record = content.config_records["node"]
    return int(_number(record, "partition-id")), int(_number(record, "num-partitions"))
