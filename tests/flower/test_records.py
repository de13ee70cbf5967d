"""flora objects through Flower records and back: bitwise, residuals and scalings included."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

import torch
from flwr.app import ArrayRecord

from flora.adapters import LoraFactors
from flora.config import load_config
from flora.flower.records import (
    adapter_from_record,
    adapter_to_record,
    config_json,
    task_from_record,
    task_to_record,
    updates_from_record,
    updates_to_record,
)
from flora.protocol import ClientTask, RoundUpdate

SHAPES = {"model.layers.0.self_attn.q_proj": (6, 5), "model.layers.0.self_attn.v_proj": (3, 5)}


def _adapter(rank: int, scaling: float = 1.0, seed: int = 0) -> dict[str, LoraFactors]:
    generator = torch.Generator().manual_seed(seed)
    return {
        m: LoraFactors(
            torch.randn(rank, i, generator=generator), torch.randn(o, rank, generator=generator),
            scaling,
        )
        for m, (o, i) in SHAPES.items()
    }  # fmt: skip


def test_an_adapter_survives_an_array_record_bitwise():
    # Prepare
    adapter = _adapter(3, scaling=2.0)
    # Execute
    record = ArrayRecord(adapter_to_record(adapter))
    back = adapter_from_record(dict(record.to_torch_state_dict()), scaling=2.0)
    # Assert
    assert back.keys() == adapter.keys()
    for m in adapter:
        assert torch.equal(back[m].A, adapter[m].A) and torch.equal(back[m].B, adapter[m].B)
        assert back[m].scaling == 2.0


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
    task = ClientTask(2, 3, 4, 8.0, 12345, freeze_A=True, bytes_down=99)
    task.catch_up = [RoundUpdate(1, _adapter(2)), RoundUpdate(2, _adapter(2))]
    task.since, task.through = 0, 2
    info = task_from_record(task_to_record(task, config_json(config)))
    assert (info.task.client, info.task.round, info.task.rank, info.task.seed) == (2, 3, 4, 12345)
    assert info.task.alpha == 8.0 and info.task.freeze_A and info.task.bytes_down == 99
    assert (info.since, info.through, info.catch_up_rounds) == (0, 2, [1, 2])
    assert info.config == config
