"""A client node's work on one message: flora's client round on this node's own base.

The ClientApp and the node's warm worker both call these. Each reads the task, finds the node's
cached model and data partition (flora.node_state), runs :func:`flora.client.client_round`
with the node's base (restore the stored snapshot, merge the missed updates: bitwise as the
server's copy merges them), stores the new base after a success, and returns the reply.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from flwr.app import RecordDict

from flora import client as core
from flora.errors import FloraError
from flora.flower.node import Node
from flora.flower.records import (
    TaskInfo,
    adapter_from_record,
    result_to_content,
    task_from_record,
    unpack,
    updates_from_record,
)
from flora.node_state import NodeBase, load_base, load_data

__all__ = ["WORK", "Node", "evaluate", "process_age", "train"]


def _task(content: RecordDict, node: Node) -> TaskInfo:
    info = task_from_record(content.config_records["task"])
    if info.task.client != node.partition:
        raise FloraError(
            f"a task for partition {info.task.client} reached the node of partition "
            f"{node.partition}; give every node its own partition-id"
        )
    info.task.catch_up = updates_from_record(
        content.array_records["catch-up"], info.catch_up_rounds
    )
    return info


def _adapter(content: RecordDict, name: str) -> core.Adapter | None:
    if name not in content.array_records:
        return None
    return adapter_from_record(unpack(content.array_records[name]))


def process_age() -> float:
    """Seconds since this process started (Linux /proc; nan elsewhere)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def _work(content: RecordDict, node: Node, *, train: bool) -> RecordDict:
    started, received, age = time.perf_counter(), time.time(), process_age()
    info = _task(content, node)
    task, config = info.task, info.config
    task.init = _adapter(content, "init")
    task.folded = _adapter(content, "folded")
    if "core" in content.array_records:
        task.core = unpack(content.array_records["core"])
    base = NodeBase(load_base(config, node.device or None), node.directory)
    data = load_data(config, task.client, base.tokenizer, node.state_dir)
    loaded = time.perf_counter() - started
    result = core.client_round(
        base, data, task, config, train=train, evaluate=not train, lora=_adapter(content, "lora")
    )
    if result.error is None:
        base.store(task)
    if train:
        result.timing = {
            "process-age": age,
            "prepare-seconds": loaded + result.sync_seconds,
            "received-at": received,
            "replied-at": time.time(),
        }
    return result_to_content(result)


def train(content: RecordDict, node: Node) -> RecordDict:
    """One local round; the reply holds the trained factors and the client's metrics."""
    return _work(content, node, train=True)


def evaluate(content: RecordDict, node: Node) -> RecordDict:
    """Held-out loss and sample answers of the global model on this node's synced base."""
    return _work(content, node, train=False)


WORK = {"train": train, "evaluate": evaluate}  # a message kind's work on a node
