"""``flora flower-supernode``: Flower's SuperNode, polling its SuperLink more often when idle.

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none sleeps a fixed
3 s (``flwr.supernode.start_client_internal``); once it has a message it waits for the reply in
steps of 0.5 s. So a round's message reaches an idle node 1.5 s late on average (up to 3 s), and
the reply leaves up to 0.5 s after it is ready; and when it pulls a message whose arrays the
ServerApp has not finished pushing, it retries after 1 s, then 2, 4 (capped at 10). Together
most of Flower's fixed cost per round on loopback once no process starts per message
(bench/flower_overhead.py). This command runs Flower's own SuperNode
(``flwr.supernode.cli.flower_supernode``, every flag unchanged) with the two waits capped at
``--idle-poll`` seconds (default 0.2), the loop module's ``time`` replaced by a view of it whose
``sleep`` is capped, and its array pulls retrying after 20 ms, doubling up to 0.5 s
(``RETRY_FIRST``, ``RETRY_CAP``); nothing else changes. A SuperLink then sees one pull request
per node every ``--idle-poll`` seconds instead of every 3 s.

Written against flwr 1.41 (pinned in constraints.lock); tests/flower/test_supernode.py fails if
the loop stops sleeping through its ``time`` module.
"""

from __future__ import annotations

import functools
import sys
import time
import types
from typing import Any

__all__ = ["RETRY_CAP", "RETRY_FIRST", "CappedSleep", "run"]

RETRY_FIRST, RETRY_CAP = 0.02, 0.5  # seconds: a missing array's first retry, the longest


class CappedSleep(types.ModuleType):
    """The ``time`` module, with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def run(argv: list[str], idle_poll: float) -> None:
    """Flower's ``flower-supernode`` with ``argv``, its waits capped at ``idle_poll`` s."""
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    loop.time = CappedSleep(idle_poll)
    loop.pull_objects = functools.partial(
        loop.pull_objects, initial_backoff=RETRY_FIRST, backoff_cap=RETRY_CAP
    )
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
