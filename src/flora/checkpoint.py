"""Atomic per-round checkpoints of a run, and finding the last complete one.

checkpoints/round_0003/
  state.json              round, server state, RNG state, written last: its presence marks the
                          round complete (the whole directory is renamed into place at once)
  update.safetensors      that round's merged update (methods that merge into the base):
                          RoundUpdate.to_tensors, flora.adapters' codec plus residual.<module>
  global_lora.safetensors the global LoRA (methods that keep one), flora.adapters' codec
  sketches.safetensors    each client's base sketch (catch-up check)
  rng.safetensors         the torch RNG state
Every file and the directory are fsynced before the rename; state.json records each file's
SHA-256 and config.json's, and resuming checks them (a changed file or config is one clear
error). Everything loads through safetensors or JSON: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flora.adapters import Adapter, adapter_from_tensors, adapter_to_tensors
from flora.errors import FloraError
from flora.io import atomic_write_json
from flora.protocol import RoundUpdate

__all__ = ["Checkpoint", "latest_round", "load_checkpoint", "save_checkpoint", "sha256"]


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
    fingerprint: str | None = None,
) -> Path:
    """Write round ``round``'s checkpoint into a temporary directory, then rename it into place;
    ``fingerprint`` identifies the run's config (flora.config.config_fingerprint)."""
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
    files = {}
    for path in sorted(tmp.iterdir()):
        files[path.name] = sha256(path)
        _fsync(path)
    integrity: dict[str, Any] = {"files": files}
    if fingerprint is not None:
        integrity["config_fingerprint"] = fingerprint
    atomic_write_json(tmp / "state.json", {"round": round, **state, **integrity})
    _fsync(tmp)  # the directory's entries, before it is renamed into place
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync(final.parent)
    return final


def sha256(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verify(directory: Path, state: dict[str, Any], names: Sequence[str]) -> None:
    """Every listed file of the checkpoint in ``directory`` still has its recorded SHA-256
    (checkpoints written before flora recorded them are taken as they are)."""
    recorded = state.get("files")
    if not isinstance(recorded, dict):
        return
    for name in names:
        path = directory / name
        if name not in recorded:
            continue
        if not path.is_file():
            raise FloraError(f"{path} is missing from its checkpoint; resume from an earlier round")
        if sha256(path) != recorded[name]:
            raise FloraError(
                f"{path}: SHA-256 differs from the one recorded when it was written (the file "
                "changed or is damaged); restore it, or delete this round's checkpoint and "
                "those after it to resume from an earlier round"
            )


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


def _state(directory: Path) -> dict[str, Any]:
    path = directory / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FloraError(
            f"{path}: unreadable ({error}); delete this round's checkpoint to resume from the one "
            "before it"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("round"), int):
        raise FloraError(f"{path}: not a flora checkpoint state; delete this round's checkpoint")
    return state


def load_checkpoint(run_dir: Path, fingerprint: str | None = None) -> Checkpoint:
    """The last complete checkpoint with the merged-update history up to it, every file checked
    against its recorded SHA-256, and the run's config (``fingerprint``) against the one the
    checkpoint was written with."""
    last = latest_round(run_dir)
    if last == 0:
        raise FloraError(f"{run_dir}: no complete checkpoint to resume; start the run again")
    directory = _round_dir(run_dir, last)
    state = _state(directory)
    _verify(directory, state, sorted(p.name for p in directory.iterdir() if p.name != "state.json"))
    recorded = state.get("config_fingerprint")
    if recorded is not None and fingerprint is not None and recorded != fingerprint:
        raise FloraError(
            f"{run_dir / 'config.json'} differs from the config this run's checkpoints were "
            "written with (edited or replaced; only federation.rounds may grow, through "
            "--rounds); restore it, or start a new run with the new config"
        )
    history = []
    for round in state.get("history_rounds", []):
        path = _round_dir(run_dir, round) / "update.safetensors"
        if round != last:
            _verify(path.parent, _state(path.parent), [path.name])
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
