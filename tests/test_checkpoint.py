"""A method's own server state through checkpoints: one file per named group, and checkpoints
written before methods owned their state."""

from __future__ import annotations

import json

import pytest
import torch

from flora.checkpoint import load_checkpoint, save_checkpoint
from flora.errors import FloraError


def test_method_state_groups_round_trip_bitwise(tmp_path):
    # Prepare: a state a method might keep: a global LoRA, server optimiser moments, an empty one
    state = {
        "global_lora": {"m.lora_A.weight": torch.randn(2, 5), "m.lora_B.weight": torch.zeros(3, 2)},
        "moments": {"m": torch.randn(3, 5, dtype=torch.float64)},
        "empty": {},
    }
    # Execute
    save_checkpoint(tmp_path, 1, {"synced": [0]}, None, state, {})
    loaded = load_checkpoint(tmp_path)
    # Assert
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "round_0001").iterdir()) == [
        "empty.safetensors",
        "global_lora.safetensors",
        "moments.safetensors",
        "rng.safetensors",
        "sketches.safetensors",
        "state.json",
    ]
    assert loaded.method_state.keys() == state.keys()
    for group, tensors in state.items():
        assert loaded.method_state[group].keys() == tensors.keys()
        assert all(torch.equal(loaded.method_state[group][k], v) for k, v in tensors.items())
    assert loaded.global_lora is not None and loaded.global_lora["m"].rank == 2


def test_a_checkpoint_written_before_methods_owned_their_state_still_loads(tmp_path):
    lora = {"m.lora_A.weight": torch.randn(2, 5), "m.lora_B.weight": torch.randn(3, 2)}
    directory = save_checkpoint(tmp_path, 1, {"synced": [0]}, None, {"global_lora": lora}, {})
    path = directory / "state.json"
    state = json.loads(path.read_text())
    del state["method_state"], state["digest"]  # neither was written then
    path.write_text(json.dumps(state))
    loaded = load_checkpoint(tmp_path)
    assert torch.equal(
        loaded.method_state["global_lora"]["m.lora_B.weight"], lora["m.lora_B.weight"]
    )


@pytest.mark.parametrize("group", ["update", "rng", "../x", "Global", ""])
def test_a_group_that_cannot_be_a_file_of_its_own_is_refused(tmp_path, group):
    with pytest.raises(FloraError, match="name it with lowercase letters, digits and _"):
        save_checkpoint(tmp_path, 1, {"synced": [0]}, None, {group: {}}, {})


def test_a_missing_group_file_is_one_clear_error(tmp_path):
    directory = save_checkpoint(tmp_path, 1, {"synced": [0]}, None, {"moments": {}}, {})
    (directory / "moments.safetensors").unlink()
    with pytest.raises(FloraError, match="moments.safetensors is missing from its checkpoint"):
        load_checkpoint(tmp_path)
