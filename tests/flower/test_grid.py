"""PollingGrid: replies are collected as they come, and a round stops waiting at its timeout."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

from flwr.app import Message, RecordDict
from tests.flower.inline_grid import InlineGrid

from flora.errors import FloraError
from flora.flower.client_app import make_client_app
from flora.flower.grid import PollingGrid


class SlowGrid(InlineGrid):
    """Pushes are answered on the ``ready_after``-th pull (never, when 0)."""

    def __init__(self, ready_after: int) -> None:
        super().__init__(make_client_app(), 1)
        self.ready_after, self.pulls, self.pushed = ready_after, 0, []

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        self.pushed = list(messages)
        return [f"id-{k}" for k in range(len(self.pushed))]

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        self.pulls += 1
        if self.pulls != self.ready_after:
            return []
        replies = []
        for k, message in enumerate(self.pushed):
            reply = Message(RecordDict(), reply_to=message)
            # the id a SuperLink gives the pushed message (Metadata has no setter for it)
            reply.metadata.__dict__["_reply_to_message_id"] = f"id-{k}"
            replies.append(reply)
        return replies


def _messages(n: int) -> list[Message]:
    return [Message(RecordDict(), 101, "query") for _ in range(n)]


def test_replies_are_pulled_every_interval_until_all_came():
    inner = SlowGrid(ready_after=3)
    start = time.monotonic()
    replies = list(PollingGrid(inner, 0.05).send_and_receive(_messages(2), timeout=30))
    assert len(replies) == 2 and inner.pulls == 3
    assert time.monotonic() - start < 1.0  # two short waits, not Flower's 2 x 3 s


def test_a_round_stops_waiting_at_its_timeout():
    inner = SlowGrid(ready_after=0)
    start = time.monotonic()
    assert list(PollingGrid(inner, 0.05).send_and_receive(_messages(1), timeout=0.3)) == []
    assert 0.3 <= time.monotonic() - start < 2.0


def test_the_interval_must_be_positive():
    with pytest.raises(FloraError, match="poll-interval"):
        PollingGrid(SlowGrid(1), 0)
