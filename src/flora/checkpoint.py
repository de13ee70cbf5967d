"""Atomic per-round checkpoints of a run, and finding the last complete one.

checkpoints/round_0003/
  state.json              round, server state, RNG state, written last: its presence marks the
                          round complete (the whole directory is renamed into place at once)
  update.safetensors      that round's merged update (methods that merge into the base):
                          RoundUpdate.to_tensors, flora.adapters' codec plus residual.<module>
  global_lora.safetensors the global LoRA (methods that keep one), flora.adapters' codec
  sketches.safetensors    each client's base sketch (catch-up check)
Everything loads through safetensors or JSON: no pickle.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flora.adapters import Adapter, adapter_from_tensors, adapter_to_tensors
from flora.errors import FloraError
from flora.io import atomic_write_json
from flora.protocol import RoundUpdate

__all__ = ["Checkpoint", "latest_round", "load_checkpoint", "save_checkpoint"]


@dataclass
class Checkpoint:
    round: int
    state: dict[str, Any]
    history: list[RoundUpdate]
    global_lora: Adapter | None
    sketches: dict[int, dict[str, torch.Tensor]]


def _round_dir(run_dir: Path, round: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round:04d}"


def save_checkpoint(
    run_dir: Path,
    round: int,
    state: dict[str, Any],
    update: RoundUpdate | None,
    global_lora: Adapter | None,
    sketches: dict[int, dict[str, torch.Tensor]],
) -> Path:
    """Write round ``round``'s checkpoint into a temporary directory, then rename it into place."""
    final = _round_dir(run_dir, round)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if update is not None:
        save_file(update.to_tensors(), str(tmp / "update.safetensors"))
    if global_lora is not None:
        save_file(adapter_to_tensors(global_lora), str(tmp / "global_lora.safetensors"))
    packed = {
        f"{k}.{m}": s.contiguous() for k, sketch in sketches.items() for m, s in sketch.items()
    }
    save_file(packed or {"empty": torch.zeros(1)}, str(tmp / "sketches.safetensors"))
    rng = {"torch_rng_state": torch.get_rng_state()}
    save_file(rng, str(tmp / "rng.safetensors"))
    atomic_write_json(tmp / "state.json", {"round": round, **state})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_round(run_dir: Path) -> int:
    """The last round whose checkpoint is complete (0: none)."""
    rounds = [
        int(d.name.split("_")[1])
        for d in (run_dir / "checkpoints").glob("round_[0-9][0-9][0-9][0-9]")
        if (d / "state.json").is_file()
    ]
    return max(rounds, default=0)


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises several types for damaged files
        raise FloraError(
            f"{path}: unreadable checkpoint file ({error}); resume from an earlier round"
        ) from None


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The last complete checkpoint with the merged-update history up to it."""
    last = latest_round(run_dir)
    if last == 0:
        raise FloraError(f"{run_dir}: no complete checkpoint to resume; start the run again")
    directory = _round_dir(run_dir, last)
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    history = []
    for round in state.get("history_rounds", []):
        path = _round_dir(run_dir, round) / "update.safetensors"
        history.append(RoundUpdate.from_tensors(_load(path), round))
    lora_path = directory / "global_lora.safetensors"
    global_lora = None
    if lora_path.is_file():
        global_lora = adapter_from_tensors(_load(lora_path), source=str(lora_path))
    sketches: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _load(directory / "sketches.safetensors").items():
        if key != "empty":
            client, module = key.split(".", 1)
            sketches.setdefault(int(client), {})[module] = value
    torch.set_rng_state(_load(directory / "rng.safetensors")["torch_rng_state"])
    return Checkpoint(last, state, history, global_lora, sketches)
