"""flora objects through Flower records and back: bitwise, residuals and scalings included."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from flora.client import ClientResult
from flora.config import load_config
from flora.errors import FloraError
from flora.factors import LoraFactors
from flora.flower.records import (
    PACKED,
    adapter_from_record,
    adapter_to_record,
    config_json,
    pack,
    result_from_content,
    result_to_content,
    task_from_record,
    task_to_record,
    unpack,
    updates_from_record,
    updates_to_record,
)
from flora.protocol import ClientTask, RoundUpdate

SHAPES = {"model.layers.0.self_attn.q_proj": (6, 5), "model.layers.0.self_attn.v_proj": (3, 5)}


def _adapter(rank: int, scaling: float = 1.0, seed: int = 0) -> dict[str, LoraFactors]:
    generator = torch.Generator().manual_seed(seed)
    return {
        m: LoraFactors(
            torch.randn(rank, i, generator=generator),
            torch.randn(o, rank, generator=generator),
            scaling,
        )
        for m, (o, i) in SHAPES.items()
    }


def test_an_adapter_survives_an_array_record_bitwise():
    # Prepare
    adapter = _adapter(3, scaling=2.0)
    # Execute
    record = pack(adapter_to_record(adapter))
    back = adapter_from_record(unpack(record), scaling=2.0)
    # Assert
    assert back.keys() == adapter.keys()
    for m in adapter:
        assert torch.equal(back[m].A, adapter[m].A) and torch.equal(back[m].B, adapter[m].B)
        assert back[m].scaling == 2.0


def test_a_packed_record_is_a_few_flower_objects_and_every_dtype_comes_back_bitwise():
    # Prepare: a SmolLM2-shaped adapter (30 layers x q, v at rank 16) and other dtypes
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    tensors = {
        f"{layer}.{m}.lora_{ab}.weight": torch.randn(16, 576) if ab == "A" else torch.randn(o, 16)
        for layer in range(30)
        for m, o in (("q_proj", 576), ("v_proj", 192))
        for ab in "AB"
    }
    others = {"h": torch.randn(3, 4).to(torch.bfloat16), "i": torch.arange(5), "f": torch.ones(2)}
    # Execute
    packed = Message(RecordDict({"factors": pack(tensors)}), 1, "train")
    plain = Message(RecordDict({"factors": ArrayRecord(tensors)}), 1, "train")
    back = unpack(pack(tensors | others))
    # Assert: Flower sends 5 objects instead of 243 (a request each, every hop); bitwise back
    assert len(get_all_nested_objects(packed)) <= 5 < 200 < len(get_all_nested_objects(plain))
    assert back.keys() == (tensors | others).keys()
    for key, value in (tensors | others).items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert unpack(pack({})) == {}


def _forged(header: dict, data: bytes = b"\0" * 8) -> ArrayRecord:
    raw = json.dumps(header).encode()
    blob = len(raw).to_bytes(8, "little") + raw + data
    return ArrayRecord({PACKED: Array(np.frombuffer(blob, dtype=np.uint8))})


@pytest.mark.parametrize(
    ("record", "limit", "message"),
    [
        (_forged({"x": {"dtype": "F32", "shape": [2**35], "data_offsets": [0, 2**37]}}), 10**6,
         "more than the 1000000 elements"),
        (_forged({"x": {"dtype": "F32", "shape": [2**35], "data_offsets": [0, 2**37]}}), None,
         "do not read"),
        (_forged({"x": {"dtype": "STR", "shape": [2], "data_offsets": [0, 8]}}), None,
         "of dtype STR"),
        (_forged({"x": "nonsense"}), None, "no readable header"),
        (ArrayRecord({PACKED: Array(np.frombuffer(b"\xff" * 12, dtype=np.uint8))}), None,
         "no readable header"),
        (ArrayRecord({"a": torch.zeros(2), "b": torch.zeros(2)}), None, "not one packed"),
    ],
)  # fmt: skip
def test_a_forged_packed_record_is_refused_before_any_tensor_is_made(record, limit, message):
    with pytest.raises(FloraError, match=message):
        unpack(record, limit)


def test_catch_up_updates_keep_their_order_rounds_and_residuals():
    residual = {m: torch.randn(o, i) for m, (o, i) in SHAPES.items()}
    updates = [RoundUpdate(2, _adapter(4, seed=1)), RoundUpdate(5, _adapter(2, seed=2), residual)]
    back = updates_from_record(updates_to_record(updates), [2, 5])
    assert [u.round for u in back] == [2, 5]
    assert back[0].residual is None
    assert back[1].residual is not None
    for m in SHAPES:
        assert torch.equal(back[0].factors[m].B, updates[0].factors[m].B)
        assert torch.equal(back[1].residual[m], residual[m])
    assert updates_from_record(updates_to_record([]), []) == []


def test_a_task_carries_its_config_and_catch_up_range():
    config = load_config("configs/tiny.toml")
    task = ClientTask(2, 3, 4, 8.0, 12345, trains=frozenset("B"), bytes_down=99)
    task.catch_up = [RoundUpdate(1, _adapter(2)), RoundUpdate(2, _adapter(2))]
    task.since, task.through = 0, 2
    info = task_from_record(task_to_record(task, config_json(config)))
    assert (info.task.client, info.task.round, info.task.rank, info.task.seed) == (2, 3, 4, 12345)
    assert info.task.alpha == 8.0 and info.task.freeze_A and info.task.bytes_down == 99
    assert (info.since, info.through, info.catch_up_rounds) == (0, 2, [1, 2])
    assert info.config == config


@pytest.mark.parametrize("curve", [[2.5, 2.25, 1.0 / 3.0], []], ids=["steps", "no step"])
def test_a_result_carries_its_local_loss_curve_over_the_wire(curve):
    # Prepare
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    result = ClientResult(1, 2, factors=_adapter(2), examples=7, steps=len(curve))
    result.loss_curve = list(curve)
    # Execute: to a reply, through Flower's protobuf (what a real node sends), and back
    content = recorddict_from_proto(recorddict_to_proto(result_to_content(result)))
    back = result_from_content(content)
    # Assert
    assert back.loss_curve == curve  # bitwise: float64 both ways
    assert back.timing == {}  # the curve is not mistaken for one of the node's timings
