"""flora's round protocol behind Flower's four strategy hooks (Message API, flwr 1.41).

The work is flora's :class:`~flora.server.Server`: it samples (seeded by round, as embedded),
configures each client's task (its rank, seed, the merged updates it missed or its slice of the
global LoRA) and aggregates with the method registry. This class only turns tasks into Messages
addressed to the node holding each partition and replies into ClientResults; the run's rows,
evaluation and checkpoints are flora.engine.RunCore's, as in the embedded runtime.

Partial participation and failures: a sampled client whose reply is an error or never comes is
left out of that round's aggregation and ``Server.complete`` does not advance its catch-up
position, so its next task resends what it missed (the node stores its new base only after a
round succeeds); a node that lost its stored base gets every update again, from the pristine
weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flora.client import ClientResult
from flora.errors import FloraError
from flora.flower.records import (
    adapter_to_record,
    result_from_content,
    task_to_record,
    updates_to_record,
)
from flora.flower.state import RESYNC
from flora.protocol import ClientTask
from flora.server import RoundOutcome, Server

__all__ = ["FloraStrategy"]


class FloraStrategy(Strategy):
    """Drives a flora ``Server`` through Flower; ``nodes`` maps partition -> node id."""

    def __init__(
        self,
        server: Server,
        nodes: dict[int, int],
        config_json: str,
        client_eval: bool = False,
        run_key: str = "",
    ) -> None:
        self.server = server
        self.run_key = run_key  # names the nodes' state of this flora run
        self.client_eval = client_eval  # also measure the held-out loss on a client node
        self.nodes = nodes
        self.partitions = {node: k for k, node in nodes.items()}
        self.config_json = config_json
        self.tasks: list[ClientTask] = []  # the round's train tasks ...
        self.results: list[ClientResult] = []  # ... and what came of each, in the same order
        self.outcome: RoundOutcome | None = None  # the round's aggregation
        self.evaluation: ClientResult | None = None  # the round's client-side evaluation
        self._eval_tasks: list[ClientTask] = []

    def summary(self) -> None:
        config = self.server.config
        log(INFO, "\t├── flora method: %s", self.server.method.name)
        log(INFO, "\t├── clients: %d, ranks %s", self.server.num_clients, self.server.ranks)
        log(INFO, "\t└── fraction %.2f, catch-up %s", config.federation.fraction,
            config.federation.catch_up)  # fmt: skip

    def run_rounds(
        self, grid: Grid, first: int, timeout: float, end_round: Callable[[int], None]
    ) -> None:
        """Rounds ``first`` .. the config's last, as ``Strategy.start`` runs rounds 1..N (train,
        then client-side evaluation), but able to start after a checkpoint; ``end_round(t)``
        is the run's own end of round (rows, server-side evaluation, checkpoint)."""
        for t in range(first, self.server.config.federation.rounds + 1):
            log(INFO, "")
            log(INFO, "[flora ROUND %s/%s]", t, self.server.config.federation.rounds)
            replies = grid.send_and_receive(
                self.configure_train(t, ArrayRecord(), ConfigRecord(), grid), timeout=timeout
            )
            _, metrics = self.aggregate_train(t, replies)
            log(INFO, "\t└──> %s", metrics)
            self.evaluate_on_client(grid, t, timeout)
            end_round(t)

    def evaluate_on_client(self, grid: Grid, round: int, timeout: float) -> ClientResult | None:
        """With ``client_eval``, one node's measure of the global model (else None)."""
        messages = self.configure_evaluate(round, ArrayRecord(), ConfigRecord(), grid)
        self.evaluation = None
        if messages:
            self.aggregate_evaluate(round, grid.send_and_receive(messages, timeout=timeout))
        return self.evaluation

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

    def _collect(self, tasks: list[ClientTask], replies: Iterable[Message], kind: str
                 ) -> list[ClientResult]:  # fmt: skip
        """One result per task, in order: the reply's, or an error one; then the server
        records which clients completed (and which lost their stored base)."""
        by_client: dict[int, ClientResult] = {}
        lost: set[int] = set()
        for reply in replies:
            k = self.partitions.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                reason = reply.error.reason or "no reason given"
                log(WARNING, "%s: client %d failed: %s", kind, k, reason)
                by_client[k] = ClientResult(k, tasks[0].round if tasks else 0, error=reason)
                if RESYNC in reason:
                    lost.add(k)
                continue
            try:
                result = result_from_content(reply.content)
            except (FloraError, KeyError, ValueError, TypeError) as error:  # a malformed reply
                log(WARNING, "%s: client %d sent an unreadable reply: %s", kind, k, error)
                result = ClientResult(k, 0, error=f"unreadable reply: {error}")
            if result.client != k and k != -1:
                result = ClientResult(k, 0, error=f"a reply of partition {result.client}")
            by_client[result.client] = result
        results = []
        for task in tasks:
            missing = ClientResult(task.client, task.round, error="no reply before the timeout")
            results.append(by_client.get(task.client, missing))
        done = [r.client for r in results if r.error is None]
        self.server.complete(tasks, done=done, lost=lost)
        return results

    # --- training ------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.tasks = self.server.configure(server_round)
        messages = []
        for task in self.tasks:
            extra = {}
            if task.init is not None:
                extra["init"] = ArrayRecord(adapter_to_record(task.init))
            messages.append(self._message(MessageType.TRAIN, task, **extra))
        log(INFO, "configure_train: clients %s", [t.client for t in self.tasks])
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and aggregate; returns what travels down (the merged factors
        or the global LoRA) and the round's metrics."""
        self.results = self._collect(self.tasks, replies, "train")
        self.outcome = self.server.aggregate(server_round, self.tasks, self.results)
        trained = sum(r.ok for r in self.results)
        if self.outcome is None:
            return None, MetricRecord({"clients": 0})
        arrays = ArrayRecord(adapter_to_record(self.outcome.travels(self.server)))
        return arrays, MetricRecord({"clients": trained, "noise": self.outcome.report.noise})

    # --- evaluation ----------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """With ``client_eval``, one node measures the global model on its own synced base
        (every node holds the same held-out set); else the ServerApp evaluates by itself."""
        self._eval_tasks = []
        last = self.server.config.federation.rounds
        if not self.client_eval or not self.server.config.eval.heldout_at(server_round, last):
            return []
        trained = [r.client for r in self.results if r.ok]
        self._eval_tasks = self.server.configure(server_round, [min(trained or [0])])
        (task,) = self._eval_tasks
        extra = {}
        if self.server.global_lora is not None:
            extra["lora"] = ArrayRecord(adapter_to_record(self.server.global_lora))
        return [self._message(MessageType.EVALUATE, task, **extra)]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        (result,) = self._collect(self._eval_tasks, replies, "evaluate")
        if result.error is not None or result.heldout_loss is None:
            return None
        self.evaluation = result
        return MetricRecord({"heldout-loss": result.heldout_loss})
