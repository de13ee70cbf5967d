"""flora's round protocol behind Flower's four strategy hooks (Message API, flwr 1.41).

The work is flora's :class:`~flora.server.Server`: it samples (seeded by round, as embedded),
configures each client's task (its rank, seed, the merged updates it missed or its slice of the
global LoRA) and aggregates with the method registry. This class turns tasks into Messages
addressed to the node holding each partition, replies into uploads, and writes the same
metrics rows and per-round checkpoints as the embedded runtime.

Partial participation and failures: a sampled client whose reply is an error or never comes is
left out of that round's aggregation, and its catch-up position is rolled back, so its next task
resends what it missed (the node stores its new base only after a round succeeds); a node that
lost its stored base gets every update again, from the pristine weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flora.checkpoint import save_checkpoint
from flora.flower.records import (
    Upload,
    adapter_to_record,
    evaluation_from_content,
    partition_of,
    task_to_record,
    updates_to_record,
    upload_from_content,
)
from flora.flower.state import RESYNC
from flora.metrics import MetricsLog
from flora.server import ClientTask, Server

__all__ = ["SERVER_FAULT_ENV", "FloraStrategy"]

SERVER_FAULT_ENV = "FLORA_FLOWER_SERVER_FAULT"  # "<round>": the ServerApp dies after it


class FloraStrategy(Strategy):
    """Drives a flora ``Server`` through Flower; ``nodes`` maps partition -> node id."""

    def __init__(
        self,
        server: Server,
        nodes: dict[int, int],
        run_dir: Path,
        config_json: str,
        client_eval: bool = False,
        run_key: str = "",
    ) -> None:
        self.server = server
        self.run_key = run_key  # names the nodes' state of this flora run
        self.client_eval = client_eval  # also measure the held-out loss on a client node
        self.nodes = nodes
        self.partitions = {node: k for k, node in nodes.items()}
        self.run_dir = run_dir
        self.config_json = config_json
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.evaluations: dict[int, dict[str, Any]] = {}  # round -> eval row
        self._pending: dict[int, tuple[ClientTask, int]] = {}  # partition -> (task, since)
        self._trained: list[int] = []  # clients whose upload the last round aggregated
        self._started = 0.0
        self._started_at = 0.0  # Unix time of the round's start, for the message latencies

    def summary(self) -> None:
        config = self.server.config
        log(INFO, "\t├── flora method: %s", self.server.method.name)
        log(INFO, "\t├── clients: %d, ranks %s", self.server.num_clients, self.server.ranks)
        log(INFO, "\t└── fraction %.2f, catch-up %s", config.federation.fraction,
            config.federation.catch_up)  # fmt: skip

    def run_rounds(
        self,
        grid: Grid,
        first: int,
        timeout: float,
        evaluate_fn: Callable[[int], MetricRecord | None],
    ) -> None:
        """Rounds ``first`` .. the config's last, as ``Strategy.start`` runs rounds 1..N
        (train, client-side evaluation, server-side evaluation), but able to start after a
        checkpoint: a resumed run goes on with its own round numbers."""
        for t in range(first, self.server.config.federation.rounds + 1):
            log(INFO, "")
            log(INFO, "[flora ROUND %s/%s]", t, self.server.config.federation.rounds)
            replies = grid.send_and_receive(
                self.configure_train(t, ArrayRecord(), ConfigRecord(), grid), timeout=timeout
            )
            _, metrics = self.aggregate_train(t, replies)
            log(INFO, "\t└──> %s", metrics)
            replies = grid.send_and_receive(
                self.configure_evaluate(t, ArrayRecord(), ConfigRecord(), grid), timeout=timeout
            )
            self.aggregate_evaluate(t, replies)
            evaluate_fn(t)

    # --- messages ------------------------------------------------------------------------
    def _message(self, kind: str, task: ClientTask, since: int, **arrays: ArrayRecord) -> Message:
        through = len(self.server.history)
        content = RecordDict(
            {
                "task": task_to_record(task, self.config_json, since, through, self.run_key),
                "catch-up": updates_to_record(task.catch_up),
                **arrays,
            }
        )
        return Message(content, self.nodes[task.client], kind, group_id=str(task.round))

    def _configure(self, round: int, clients: list[int] | None) -> list[tuple[ClientTask, int]]:
        before = list(self.server.synced)
        tasks = self.server.configure(round, clients)
        self._pending = {task.client: (task, before[task.client]) for task in tasks}
        return list(self._pending.values())

    def _collect(self, replies: Iterable[Message], kind: str) -> dict[int, RecordDict]:
        """Replies by partition; roll back the catch-up of every pending client that failed."""
        contents: dict[int, RecordDict] = {}
        lost: set[int] = set()
        for reply in replies:
            if reply.has_error():
                k = self.partitions.get(reply.metadata.src_node_id, -1)
                log(WARNING, "%s: client %d failed: %s", kind, k, reply.error.reason)
                if RESYNC in (reply.error.reason or ""):
                    lost.add(k)
                continue
            k = partition_of(reply.content)
            if k in self._pending:
                contents[k] = reply.content
        for k, (_, since) in self._pending.items():
            if k not in contents:  # it stored nothing: resend what it missed, or everything
                self.server.synced[k] = 0 if k in lost else since
        return contents

    # --- training ------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._started, self._started_at = time.perf_counter(), time.time()
        messages = []
        for task, since in self._configure(server_round, None):
            extra = {}
            if task.init is not None:
                extra["init"] = ArrayRecord(adapter_to_record(task.init))
            messages.append(self._message(MessageType.TRAIN, task, since, **extra))
        log(INFO, "configure_train: clients %s", sorted(self._pending))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        contents = self._collect(replies, "train")
        done = [(task, upload_from_content(contents[task.client]))
                for task, _ in self._pending.values() if task.client in contents]  # fmt: skip
        self._trained = [task.client for task, _ in done]
        row: dict[str, Any] = {"kind": "server", "round": server_round,
                               "method": self.server.method.name,
                               "failed": sorted(set(self._pending) - set(contents))}  # fmt: skip
        update, out = None, None
        if done:
            agg_start = time.perf_counter()
            tasks, uploads = [task for task, _ in done], [upload for _, upload in done]
            update, report = self.server.aggregate(
                server_round, tasks, [u.factors for u in uploads], [u.examples for u in uploads]
            )
            for task, upload, bytes_up in zip(tasks, uploads, report.bytes_up, strict=True):
                self.metrics.write(_client_row(server_round, task, upload, bytes_up))
            row |= {
                "clients": [task.client for task in tasks],
                "noise": report.noise,
                "global_rank": max(report.global_ranks.values()),
                "bytes_up": sum(report.bytes_up),
                "bytes_down": sum(task.bytes_down for task in tasks),
                "aggregate_seconds": time.perf_counter() - agg_start,
                "train_seconds": sum(u.seconds for u in uploads),  # as the embedded runtime
                "train_seconds_max": max(u.seconds for u in uploads),  # the nodes run in parallel
            }
            result = self.server.global_lora if update is None else update.factors
            out = ArrayRecord(adapter_to_record(result)) if result else None
        row["round_seconds"] = time.perf_counter() - self._started
        row["started_at"] = self._started_at
        self.metrics.write(row)
        save_checkpoint(
            self.run_dir, server_round, self.server.state(), update, self.server.global_lora, {}
        )
        if os.environ.get(SERVER_FAULT_ENV) == str(server_round):  # test hook: die here
            raise RuntimeError(f"injected ServerApp fault ({SERVER_FAULT_ENV}={server_round})")
        return out, MetricRecord({"clients": len(done), "noise": row.get("noise", math.nan)})

    # --- evaluation ----------------------------------------------------------------------
    def evaluates(self, round: int) -> bool:
        """Rounds with a held-out evaluation: before training, every ``eval.every``, last."""
        every, last = self.server.config.eval.every, self.server.config.federation.rounds
        return round in (0, last) or bool(every and round % every == 0)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """With ``client_eval``, one node measures the global model on its own synced base
        (every node holds the same held-out set); else the ServerApp evaluates by itself."""
        self._pending = {}
        if not self.client_eval or not self.evaluates(server_round):
            return []
        ((task, since),) = self._configure(server_round, [min(self._trained or [0])])
        extra = {}
        if self.server.global_lora is not None:
            extra["lora"] = ArrayRecord(adapter_to_record(self.server.global_lora))
        return [self._message(MessageType.EVALUATE, task, since, **extra)]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        contents = self._collect(replies, "evaluate")
        if not contents:
            return None
        evaluation = evaluation_from_content(contents[min(contents)])
        self.record_evaluation(
            server_round, evaluation.loss, evaluation.samples, client=evaluation.partition
        )
        return MetricRecord({"heldout-loss": evaluation.loss})

    def record_evaluation(
        self, round: int, loss: float, samples: list[dict[str, str]], client: int | None = None
    ) -> None:
        """An eval row: the server's own, or ``client``'s (the summary prefers the server's)."""
        row: dict[str, Any] = {"kind": "eval", "round": round, "heldout_loss": loss,
                               "perplexity": math.exp(loss), "samples": samples}  # fmt: skip
        if client is not None:
            row["client"] = client
        if round == self.server.config.federation.rounds:
            row["final"] = True
        self.metrics.write(row)
        if client is None or round not in self.evaluations:
            self.evaluations[round] = row


def _client_row(round: int, task: ClientTask, upload: Upload, bytes_up: int) -> dict[str, Any]:
    """The embedded runtime's client row, and two timings."""
    return {
        "kind": "client",
        "round": round,
        "client": task.client,
        "rank": task.rank,
        "train_loss": upload.train_loss,
        "examples": upload.examples,
        "tokens": upload.tokens,
        "steps": upload.steps,
        "seconds": upload.seconds,
        "bytes_up": bytes_up,
        "bytes_down": task.bytes_down,
        "catch_up_rounds": len(task.catch_up),
        # Flower only: the age of the process that ran the message (a ClientApp, or the node's
        # worker) when it arrived, the time from then until training started (imports, model,
        # base restore and catch-up, data), and when the node started and finished the message
        # (Unix time, the node's clock)
        "process_age": upload.timing.get("process-age"),
        "prepare_seconds": upload.timing.get("prepare-seconds"),
        "received_at": upload.timing.get("received-at"),
        "replied_at": upload.timing.get("replied-at"),
    }
