"""The Flower runtime: flora's tasks as Messages to the nodes, their replies as results.

The round loop is the core's (flora.engine.RunCore.play_round): the server samples (seeded by
round, as embedded), configures each client's task, screens and aggregates. This runtime only
turns a round's tasks into Messages addressed to the node holding each partition
(flora.flower.records), sends them through the Grid and reads the replies back into
ClientResults, in task order; with ``client_eval`` it also asks one node to evaluate the global
model, as Flower's ``configure_evaluate`` / ``aggregate_evaluate`` would.

Partial participation and failures: a sampled client whose reply is an error or never comes is
left out of that round's aggregation and ``Server.complete`` does not advance its catch-up
position, so its next task resends what it missed (the node stores its new base only after a
round succeeds); a node that lost its stored base answers ``flora-resync`` and gets every
update again, from the pristine weights.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from flora.client import ClientResult
from flora.engine import RunCore, Runtime
from flora.flower.records import (
    adapter_to_record,
    pack,
    result_from_content,
    task_to_record,
    updates_to_record,
)
from flora.node_state import RESYNC
from flora.protocol import ClientTask

__all__ = ["FlowerRuntime"]


class FlowerRuntime(Runtime):
    """Runs a flora ``RunCore``'s tasks on Flower nodes; ``nodes`` maps partition -> node id."""

    name = "flower"

    def __init__(
        self,
        core: RunCore,
        grid: Grid,
        nodes: dict[int, int],
        config_json: str,
        *,
        timeout: float,
        client_eval: bool = False,
        run_key: str = "",
    ) -> None:
        self.core = core
        self.grid = grid
        self.timeout = timeout
        self.run_key = run_key  # names the nodes' state of this flora run
        self.client_eval = client_eval  # also measure the held-out loss on a client node
        self.nodes = nodes
        self.partitions = {node: k for k, node in nodes.items()}
        self.config_json = config_json
        self.results: list[ClientResult] = []  # the round's results, in task order
        self.started = time.time()  # when the round's messages went out (Unix time)

    def summary(self) -> None:
        server, config = self.core.server, self.core.config
        log(INFO, "\t├── flora method: %s", server.method.name)
        log(INFO, "\t├── clients: %d, ranks %s", server.num_clients, server.ranks)
        log(
            INFO,
            "\t└── fraction %.2f, catch-up %s",
            config.federation.fraction,
            config.federation.catch_up,
        )

    # --- the core's hooks ----------------------------------------------------------------
    def execute(self, round: int, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        log(INFO, "")
        log(INFO, "[flora ROUND %s/%s]", round, self.core.config.federation.rounds)
        self.started = time.time()
        messages = [self._train_message(task) for task in tasks]
        log(INFO, "configure_train: clients %s", [t.client for t in tasks])
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        self.results = self.collect(tasks, replies, "train")
        log(INFO, "\t└──> %d of %d clients trained", sum(r.ok for r in self.results), len(tasks))
        return self.results

    def fields(self, round: int, results: Sequence[ClientResult], seconds: float) -> dict[str, Any]:
        uploads = [r for r in results if r.ok]
        extra: dict[str, Any] = {"started_at": self.started}
        if uploads:  # the nodes train in parallel
            extra["train_seconds_max"] = max(r.seconds for r in uploads)
        return extra

    def evaluate(self, round: int) -> None:
        """With ``client_eval``, one node measures the global model on its own synced base
        (every node holds the same held-out set) and its ``eval`` row is written; else the
        ServerApp evaluates by itself."""
        result = self.evaluate_on_client(round)
        if result is not None and result.heldout_loss is not None:
            self.core.outputs.eval_row(
                round, result.heldout_loss, result.samples, client=result.client
            )

    # --- messages ------------------------------------------------------------------------
    def _message(self, kind: str, task: ClientTask, **arrays: ArrayRecord) -> Message:
        content = RecordDict(
            {
                "task": task_to_record(task, self.config_json, self.run_key),
                "catch-up": updates_to_record(task.catch_up),
                **arrays,
            }
        )
        return Message(content, self.nodes[task.client], kind, group_id=str(task.round))

    def _train_message(self, task: ClientTask) -> Message:
        extra = {}
        if task.init is not None:
            extra["init"] = pack(adapter_to_record(task.init))
        if task.folded is not None:
            extra["folded"] = pack(adapter_to_record(task.folded))
        if task.core is not None:
            extra["core"] = pack(dict(task.core))
        return self._message(MessageType.TRAIN, task, **extra)

    def collect(
        self, tasks: Sequence[ClientTask], replies: Iterable[Message], kind: str
    ) -> list[ClientResult]:
        """One result per task, in order: the reply's, or an error one. A reply counts only
        from the node its task went to, once, for the task's round: a reply from a node with
        no task is left out (logged), a second reply from one node or one for another round
        makes that client a fault, and nothing in a reply can raise here (its factors' sizes
        are checked against the task before any is decoded)."""
        assigned = {t.client: t for t in tasks}
        by_client: dict[int, ClientResult] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            k = self.partitions.get(node, -1)
            task = assigned.get(k)
            if task is None:
                log(
                    WARNING,
                    "%s: a reply from node %s, which has no task here, left out",
                    kind,
                    node,
                )
                continue
            if k in by_client:
                log(WARNING, "%s: client %d replied twice; left out this round", kind, k)
                by_client[k] = ClientResult(k, task.round, error="a second reply from its node")
                continue
            by_client[k] = self._read(reply, task, kind)
        results = []
        for task in tasks:
            missing = ClientResult(task.client, task.round, error="no reply before the timeout")
            results.append(by_client.get(task.client, missing))
        return results

    def _read(self, reply: Message, task: ClientTask, kind: str) -> ClientResult:
        """One reply to ``task`` as a result, or an error result naming what is wrong."""
        k = task.client
        if reply.has_error():
            reason = reply.error.reason or "no reason given"
            log(WARNING, "%s: client %d failed: %s", kind, k, reason)
            return ClientResult(k, task.round, error=reason)
        # no LoRA of these layers holds more than full-rank factors: a reply claiming more is
        # refused before it is decoded (its rank and shapes are the screen's to judge)
        shapes = self.core.server.shapes
        limit = sum((o + i) * min(o, i) for o, i in shapes.values()) if kind == "train" else 0
        try:
            result = result_from_content(reply.content, limit)
        except Exception as error:  # anything a hostile reply can cause: MemoryError included
            log(WARNING, "%s: client %d sent an unreadable reply: %s", kind, k, error)
            return ClientResult(k, task.round, error=f"unreadable reply: {error}")
        if result.client != k:
            return ClientResult(k, task.round, error=f"a reply of partition {result.client}")
        if result.round != task.round:
            return ClientResult(
                k, task.round, error=f"a reply for round {result.round} in round {task.round}"
            )
        return result

    def evaluate_on_client(self, round: int) -> ClientResult | None:
        """With ``client_eval``, one node's measure of the global model (else None)."""
        server = self.core.server
        if not self.client_eval or not self.core.config.eval.heldout_at(
            round, self.core.config.federation.rounds
        ):
            return None
        trained = [r.client for r in self.results if r.ok]
        (task,) = server.configure(round, [min(trained or [0])])
        extra = {}
        lora = server.adapter
        if lora is not None:
            extra["lora"] = pack(adapter_to_record(lora))
        message = self._message(MessageType.EVALUATE, task, **extra)
        (result,) = self.collect(
            [task], self.grid.send_and_receive([message], timeout=self.timeout), "evaluate"
        )
        done = [result.client] if result.error is None else []
        lost = [result.client] if result.error is not None and RESYNC in result.error else []
        server.complete([task], done=done, lost=lost)
        if result.error is not None or result.heldout_loss is None:
            return None
        return result
