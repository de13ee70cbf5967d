"""A Grid that waits for replies by polling the SuperLink often, not every 3 seconds.

Flower 1.41's deployment Grid (``HttpGrid.send_and_receive``) sleeps 3 s between pulls, so every
round waits 1.5 s on average, and up to 3 s, after the last reply arrived; the simulation's grid
polls at its own ``pull_interval``. ``PollingGrid`` wraps whichever Grid the ServerApp receives
and pulls every ``interval`` seconds (run config ``poll-interval``, default 0.2 s): on loopback
or a LAN a pull with nothing ready costs about a millisecond. Everything else is delegated.

The deployment Grid also retries a reply whose arrays the SuperNode has not finished pushing
after 1 s, then 2, 4 (capped at 10): wrapping it makes this ServerApp process's HttpGrid retry
after 20 ms, doubling up to 0.5 s, as flora's SuperNodes and executors do
(flora.flower.supernode.RETRY_FIRST, RETRY_CAP).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from flora.errors import FloraError

__all__ = ["PollingGrid"]


def _quick_retries(grid: Grid) -> None:
    """Flower's deployment Grid pulls a reply's arrays through its module's ``pull_objects``."""
    from flwr.superlink.grid import http_grid

    from flora.flower.supernode import RETRY_CAP, RETRY_FIRST

    pull = http_grid.pull_objects
    if isinstance(grid, http_grid.HttpGrid) and not isinstance(pull, functools.partial):
        quick = functools.partial(pull, initial_backoff=RETRY_FIRST, backoff_cap=RETRY_CAP)
        http_grid.pull_objects = quick


class PollingGrid(Grid):
    """``grid`` with ``send_and_receive`` pulling every ``interval`` seconds."""

    def __init__(self, grid: Grid, interval: float) -> None:
        if not interval > 0:
            raise FloraError(f"run config poll-interval must be > 0 seconds, got {interval}")
        self.grid = grid
        self.interval = interval
        _quick_retries(grid)

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; pull until every one has a reply or ``timeout`` seconds passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies
