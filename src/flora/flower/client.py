"""A client node's work on one message: bring its base up to date, then train or evaluate.

The same steps as the embedded runtime's client, on this node's own copy of the base: restore
the partition's stored base (flora.flower.state), merge the missed updates in order (bitwise as
the embedded runtime merges them), run ``flora.training.train_client`` with the task's rank,
seed and init, store the new base, and return the reply content.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

from flwr.app import RecordDict

from flora.errors import FloraError
from flora.flower.node import Node
from flora.flower.records import (
    Evaluation,
    TaskInfo,
    adapter_from_record,
    evaluation_to_content,
    task_from_record,
    updates_from_record,
    upload_to_content,
)
from flora.flower.state import ClientBase, load_base, load_data
from flora.generation import generate_answer
from flora.models import resolve_precision
from flora.simulation import _deltas, applied
from flora.training import evaluate_loss, merge_into_base, train_client

__all__ = ["FAULT_ENV", "WORK", "Node", "evaluate", "train"]

FAULT_ENV = "FLORA_FLOWER_FAULT"


def _sync(content: RecordDict, node: Node) -> tuple[TaskInfo, ClientBase]:
    """Read the task and set this node's base to the server's: restore, then merge catch-up."""
    info = task_from_record(content.config_records["task"])
    if info.task.client != node.partition:
        raise FloraError(
            f"a task for partition {info.task.client} reached the node of partition "
            f"{node.partition}; give every node its own partition-id"
        )
    base = load_base(info.config)
    base.restore(node.directory, info.since)
    for update in updates_from_record(content.array_records["catch-up"], info.catch_up_rounds):
        merge_into_base(base.model, _deltas(update))  # W += B A (+ R), in order
    return info, base


def _store(info: TaskInfo, base: ClientBase, node: Node) -> None:
    """After a success only: a crash before this leaves the base the server falls back to."""
    if info.through != info.since:
        base.save(node.directory, info.through, keep_from=info.since)


def _maybe_fail(partition: int, round: int) -> None:
    """Test hook: ``FLORA_FLOWER_FAULT=<partition>@<round>[:exit]`` fails here, mid-round."""
    spec = os.environ.get(FAULT_ENV, "")
    where, _, mode = spec.partition(":")
    if not spec or where != f"{partition}@{round}":
        return
    if mode == "exit":
        os._exit(17)  # a crash: no reply, no cleanup
    raise RuntimeError(f"injected fault ({FAULT_ENV}={spec})")


def _process_age() -> float:
    """Seconds since this process started (Linux /proc; nan elsewhere)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def train(content: RecordDict, node: Node) -> RecordDict:
    """One local round; the reply holds the trained factors and the client's metrics."""
    started, received, age = time.perf_counter(), time.time(), _process_age()
    info, base = _sync(content, node)
    task, config = info.task, info.config
    init = None
    if "init" in content.array_records:
        init = adapter_from_record(dict(content.array_records["init"].to_torch_state_dict()))
    data = load_data(config, task.client, base.tokenizer, node.state_dir)
    _maybe_fail(task.client, task.round)
    precision = resolve_precision(config.train.precision)
    timing = {"process-age": age, "prepare-seconds": time.perf_counter() - started,
              "received-at": received}  # fmt: skip
    result = train_client(
        base.model,
        data.examples,
        rank=task.rank,
        alpha=task.alpha,
        target_modules=config.model.target_modules,
        config=dataclasses.replace(config.train, precision=precision),
        seed=task.seed,
        pad_id=int(base.tokenizer.pad_token_id),
        init=init,
        freeze_A=task.freeze_A,
        use_rslora=config.lora.use_rslora,
    )
    _store(info, base, node)
    return upload_to_content(task.client, result, timing | {"replied-at": time.time()})


def evaluate(content: RecordDict, node: Node) -> RecordDict:
    """Held-out loss and sample answers of the global model on this node's synced base."""
    info, base = _sync(content, node)
    config = info.config
    lora = None
    if "lora" in content.array_records:
        lora = adapter_from_record(dict(content.array_records["lora"].to_torch_state_dict()))
    data = load_data(config, info.task.client, base.tokenizer, node.state_dir)
    precision = resolve_precision(config.train.precision)
    pad_id = int(base.tokenizer.pad_token_id)
    with applied(base.model, lora):
        loss = evaluate_loss(base.model, data.heldout, batch_size=config.eval.batch_size,
                             pad_id=pad_id, precision=precision)  # fmt: skip
        samples = [
            {"instruction": str(r["instruction"]), "answer": generate_answer(
                base.model, base.tokenizer, r["instruction"], r.get("context", ""),
                template=config.data.template,  # type: ignore[arg-type]
                max_new_tokens=config.eval.max_new_tokens, precision=precision)}
            for r in data.heldout_records[: config.eval.samples]
        ]  # fmt: skip
    _store(info, base, node)
    return evaluation_to_content(Evaluation(info.task.client, loss, samples))


WORK = {"train": train, "evaluate": evaluate}  # a message kind's work on a node
