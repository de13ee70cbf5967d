"""The engine on the real packaged model (slow: run with `pytest -m slow`)."""

from __future__ import annotations

import math

import pytest

from flora.config import load_config
from flora.metrics import read_metrics
from flora.simulation import run

pytestmark = pytest.mark.slow


def test_smollm2_round_on_dolly_lowers_the_heldout_loss(tmp_path):
    overrides = [
        "federation.num_clients=2",
        "lora.ranks=[8, 4]",
        "federation.rounds=1",
        "data.limit=300",
        "data.heldout=16",
        "train.max_steps=4",
        "train.lr=1e-3",
        "eval.samples=1",
        "eval.max_new_tokens=8",
    ]
    result = run(load_config("configs/default.toml", overrides), tmp_path / "run", quiet=True)
    assert math.isfinite(result.loss_before) and result.loss_after < result.loss_before
    server = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "server"]
    assert server[0]["global_rank"] == 12 and server[0]["noise"] < 1e-5
    assert (tmp_path / "run" / "final" / "model" / "model.safetensors").is_file()
