"""What reaches the ServerApp from the wire, on the Flower apps (in-process grid): a reply that
never comes (the round's timeout), or one that is malformed, is named in metrics.jsonl and left
out, and the federation goes on. (The embedded runtime has no wire: its clients' results are
Python objects, screened the same way, tests/faults/test_hostile_clients.py.)"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from safetensors.torch import load_file
from tests.flower.inline_grid import InlineGrid

from flora.config import load_config
from flora.flower.client_app import make_client_app
from flora.flower.server_app import run_server
from flora.metrics import read_metrics

TINY = "configs/tiny.toml"
FAST = [
    "train.max_steps=1",
    "train.batch_size=2",
    "eval.samples=0",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=48",
    "federation.rounds=2",
]
Meddle = Callable[[Message], Message | None]


class MeddlingGrid(InlineGrid):
    """Partition 1's train reply in round 1 passes through ``meddle`` (None: it never comes)."""

    def __init__(self, client_app, num_partitions: int, meddle: Meddle) -> None:  # type: ignore[no-untyped-def]
        super().__init__(client_app, num_partitions)
        self.meddle = meddle

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for reply in super().send_and_receive(messages, timeout=timeout):
            meta = reply.metadata
            if (meta.message_type, meta.src_node_id, meta.group_id) == ("train", 102, "1"):
                reply = self.meddle(reply)  # type: ignore[assignment]
            if reply is not None:
                replies.append(reply)
        return replies


def without(name: str) -> Meddle:
    def drop(reply: Message) -> Message:
        del reply.content[name]
        return reply

    return drop


def metric(key: str, value: float) -> Meddle:
    def change(reply: Message) -> Message:
        metrics = dict(reply.content.metric_records["metrics"])
        reply.content["metrics"] = MetricRecord({**metrics, key: value})
        return reply

    return change


def junk_factors(reply: Message) -> Message:
    reply.content["factors"] = ArrayRecord({"not/a/module.lora_A": torch.zeros(2, 2)})
    return reply


CASES: dict[str, tuple[Meddle, str]] = {
    "no reply": (lambda reply: None, "no reply before the timeout"),
    "no metrics": (without("metrics"), "unreadable reply"),
    "no factors": (without("factors"), "no upload"),
    "a NaN example count": (metric("num-examples", math.nan), "unreadable reply"),
    "a negative example count": (metric("num-examples", -5), "example count"),
    "a count of 1e15": (metric("num-examples", 1e15), "exceeds its partition's"),
    "junk factors": (junk_factors, "unreadable reply"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_missing_or_malformed_reply_is_named_and_left_out(tmp_path, case):
    meddle, reason = CASES[case]
    config = load_config(TINY, FAST)
    grid = MeddlingGrid(make_client_app(tmp_path / "nodes"), 3, meddle)
    run_server(grid, config, tmp_path / "run", {})
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    (fault,) = [r for r in rows if r["kind"] == "fault"]
    assert (fault["round"], fault["client"]) == (1, 1)
    assert reason in fault["reason"], fault["reason"]
    servers = [r for r in rows if r["kind"] == "server"]
    assert [(r["clients"], r["failed"]) for r in servers] == [([0, 2], [1]), ([0, 1, 2], [])]
    # client 1 used nothing of round 1, so round 2 resends it round 1's merged update
    round2 = {
        r["client"]: r["catch_up_rounds"] for r in rows if r["kind"] == "client" and r["round"] == 2
    }
    assert round2[1] == 1
    model = load_file(tmp_path / "run" / "final" / "model" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.values())
