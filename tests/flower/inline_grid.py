"""A Grid that delivers each message to a ClientApp in this process: the Flower apps' logic,
without Ray or a network (fast enough to run every aggregation method)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InlineGrid(Grid):
    """Nodes 101, 102, ... hold partitions 0, 1, ...; ``down`` nodes answer with an error."""

    def __init__(
        self,
        client_app: ClientApp,
        num_partitions: int,
        before: Callable[[Message], None] | None = None,  # called before each delivery
        extra: dict[str, str] | None = None,  # more node config for every node
    ) -> None:
        self.client_app = client_app
        self.before = before
        self.node_config = {
            101 + k: {"partition-id": k, "num-partitions": num_partitions, **(extra or {})}
            for k in range(num_partitions)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # as a run sets

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self._run = run

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_config)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            if self.before is not None:
                self.before(message)
            node = message.metadata.dst_node_id
            context = Context(1, node, dict(self.node_config[node]), RecordDict(), {})
            try:
                replies.append(self.client_app(message, context))
            except Exception as error:  # as the simulation runtime's worker does
                replies.append(Message(Error(code=0, reason=repr(error)), reply_to=message))
        self.replies.extend(replies)
        return replies
