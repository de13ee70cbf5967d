"""What reaches the ServerApp from the wire, on the Flower apps (in-process grid): a reply that
never comes (the round's timeout), or one that is malformed, is named in metrics.jsonl and left
out, and the federation goes on. (The embedded runtime has no wire: its clients' results are
Python objects, screened the same way, tests/faults/test_hostile_clients.py.)"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from safetensors.torch import load_file
from tests.flower.inline_grid import InlineGrid

from flora.config import load_config
from flora.flower.client_app import make_client_app
from flora.flower.records import PACKED
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


def huge_header(reply: Message) -> Message:
    """One factor's bytes replaced by ~100 bytes whose npy header claims 200 GiB."""
    record = reply.content.array_records["factors"]
    key = next(iter(record))
    stream = io.BytesIO()
    shape = (50 * 2**30,)
    np.lib.format.write_array_header_1_0(
        stream, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    stream.write(b"\0" * 8)
    record[key] = Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=stream.getvalue())
    return reply


def huge_packed_header(reply: Message) -> Message:
    """The packed factors replaced by ~150 bytes whose safetensors header claims 200 GiB."""
    header = json.dumps(
        {
            "m.lora_A.weight": {
                "dtype": "F32",
                "shape": [50 * 2**30],
                "data_offsets": [0, 200 * 2**30],
            }
        }
    ).encode()
    data = len(header).to_bytes(8, "little") + header + b"\0" * 8
    reply.content["factors"] = ArrayRecord({PACKED: Array(np.frombuffer(data, dtype=np.uint8))})
    return reply


CASES: dict[str, tuple[Meddle, str]] = {
    "no reply": (lambda reply: None, "no reply before the timeout"),
    "no metrics": (without("metrics"), "unreadable reply"),
    "no factors": (without("factors"), "no upload"),
    "a NaN example count": (metric("num-examples", math.nan), "unreadable reply"),
    "a negative example count": (metric("num-examples", -5), "example count"),
    "a count of 1e15": (metric("num-examples", 1e15), "exceeds its partition's"),
    "junk factors": (junk_factors, "unreadable reply"),
    "a header claiming 200 GiB": (huge_header, "unreadable reply"),
    "packed tensors claiming 200 GiB": (huge_packed_header, "elements its task allows"),
    "a reply for another round": (metric("round", 0), "a reply for round 0 in round 1"),
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


class ReplayingGrid(InlineGrid):
    """Partition 1's train replies rearranged: ``twice`` delivers its round-1 reply twice;
    ``stale`` delivers its round-1 reply again in round 2 instead of round 2's; ``stray`` adds
    a copy of its round-1 reply as if from node 999, which holds no task."""

    def __init__(self, client_app, num_partitions: int, how: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__(client_app, num_partitions)
        self.how, self.kept = how, None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for reply in super().send_and_receive(messages, timeout=timeout):
            meta = reply.metadata
            if (meta.message_type, meta.src_node_id) == ("train", 102):
                if meta.group_id == "1":
                    self.kept = reply
                    if self.how == "twice":
                        replies.append(reply)
                    if self.how == "stray":  # after the genuine one: it would replace it
                        replies += [reply, from_node(reply, 999)]
                        continue
                elif self.how == "stale":
                    reply = self.kept  # type: ignore[assignment]
            replies.append(reply)
        return replies


def from_node(reply: Message, node: int) -> Message:
    """A reply as if from ``node``, its factors 50 times the original's."""
    content = RecordDict(dict(reply.content))
    factors = reply.content.array_records["factors"].to_torch_state_dict()
    content["factors"] = ArrayRecord({k: 50 * v for k, v in factors.items()})
    origin = Message(RecordDict(), node, reply.metadata.message_type, group_id="1")
    return Message(content, reply_to=origin)


@pytest.mark.parametrize(
    ("how", "fault"),
    [
        ("twice", (1, "a second reply from its node")),
        ("stale", (2, "a reply for round 1 in round 2")),
        ("stray", None),
    ],
)
def test_a_reply_counts_once_from_its_node_for_its_round(tmp_path, how, fault):
    config = load_config(TINY, FAST)
    grid = ReplayingGrid(make_client_app(tmp_path / "nodes"), 3, how)
    run_server(grid, config, tmp_path / "run", {})
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    faults = [(r["round"], r["client"], r["reason"]) for r in rows if r["kind"] == "fault"]
    if fault is None:  # the stray reply is left out; partition 1's own upload is used
        assert faults == []
        clean = tmp_path / "clean"
        run_server(InlineGrid(make_client_app(tmp_path / "n2"), 3), config, clean, {})
        runs = (tmp_path / "run", clean)
        ours, theirs = (load_file(d / "final/model/model.safetensors") for d in runs)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        return
    ((round, client, reason),) = faults
    assert (round, client) == (fault[0], 1) and fault[1] in reason, reason
