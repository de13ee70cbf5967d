"""Atomic per-round checkpoints of a run, and finding the last complete one.

checkpoints/round_0003/
  state.json              round, server state, RNG state, written last: its presence marks the
                          round complete (the whole directory is renamed into place at once)
  update.safetensors      that round's merged update (methods that merge into the base):
                          RoundUpdate.to_tensors, flora.factors' codec plus residual.<module>
  <group>.safetensors     the method's state, one file per named group (e.g.
                          global_lora.safetensors: the global LoRA, flora.factors' codec)
  sketches.safetensors    each client's base sketch (catch-up check)
  rng.safetensors         the torch RNG state
Every file and the directory are fsynced before the rename; state.json records each file's
SHA-256 and config.json's, and its own ("digest": of its canonical JSON without that key), and
resuming checks them (a changed file, state or config is one clear error). Everything loads
through safetensors or JSON: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flora.errors import FloraError
from flora.factors import Adapter, adapter_from_tensors
from flora.io import atomic_write_json
from flora.protocol import RoundUpdate

__all__ = ["Checkpoint", "latest_round", "load_checkpoint", "save_checkpoint", "sha256"]


_RESERVED = ("update", "sketches", "rng", "state")  # the checkpoint's own files
_GROUP = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass
class Checkpoint:
    round: int
    state: dict[str, Any]
    history: list[RoundUpdate]
    method_state: dict[str, dict[str, torch.Tensor]]  # the method's state groups
    sketches: dict[int, dict[str, torch.Tensor]]

    @property
    def global_lora(self) -> Adapter | None:
        """The method's global LoRA, where it keeps one (group ``global_lora``)."""
        group = self.method_state.get("global_lora")
        return adapter_from_tensors(group, source="global_lora") if group else None


def _round_dir(run_dir: Path, round: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round:04d}"


def save_checkpoint(
    run_dir: Path,
    round: int,
    state: dict[str, Any],
    update: RoundUpdate | None,
    method_state: dict[str, dict[str, torch.Tensor]],
    sketches: dict[int, dict[str, torch.Tensor]],
    fingerprint: str | None = None,
) -> Path:
    """Write round ``round``'s checkpoint into a temporary directory, then rename it into place;
    ``method_state`` is the method's state, one file per group; ``fingerprint`` identifies the
    run's config (flora.config.config_fingerprint)."""
    for group in method_state:
        if not _GROUP.match(group) or group in _RESERVED:
            raise FloraError(
                f"method state group '{group}': name it with lowercase letters, digits and _ "
                f"(not one of {_RESERVED}), so that it is a checkpoint file name"
            )
    final = _round_dir(run_dir, round)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if update is not None:
        save_file(update.to_tensors(), str(tmp / "update.safetensors"))
    for group, tensors in sorted(method_state.items()):
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / f"{group}.safetensors"))
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
    integrity["method_state"] = sorted(method_state)
    # the digest of what a reader will parse (JSON turns int keys into strings)
    record = json.loads(json.dumps({"round": round, **state, **integrity}))
    atomic_write_json(tmp / "state.json", {**record, "digest": _digest(record)})
    _fsync(tmp)  # the directory's entries, before it is renamed into place
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync(final.parent)
    return final


def _digest(state: dict[str, Any]) -> str:
    """SHA-256 of ``state``'s canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(state, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as error:
        raise FloraError(
            f"{path}: unreadable ({type(error).__name__}); delete this round's checkpoint to "
            "resume from the one before it"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("round"), int):
        raise FloraError(f"{path}: not a flora checkpoint state; delete this round's checkpoint")
    digest = state.pop("digest", None)  # absent in checkpoints written before flora kept one
    if digest is not None and digest != _digest(state):
        raise FloraError(
            f"{path}: its contents differ from the digest recorded when it was written (edited "
            "or damaged); restore it, or delete this round's checkpoint and those after it to "
            "resume from an earlier round"
        )
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
    groups = state.get("method_state")
    if not isinstance(groups, list):  # written before methods owned their state
        groups = ["global_lora"] if (directory / "global_lora.safetensors").is_file() else []
    method_state: dict[str, dict[str, torch.Tensor]] = {}
    for group in groups:
        if not isinstance(group, str) or not _GROUP.match(group) or group in _RESERVED:
            raise FloraError(
                f"{directory / 'state.json'}: method state {group!r} is not a group name; "
                "delete this round's checkpoint to resume from the one before it"
            )
        path = directory / f"{group}.safetensors"
        if not path.is_file():
            raise FloraError(f"{path} is missing from its checkpoint; resume from an earlier round")
        method_state[group] = _load(path)
    sketches: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _load(directory / "sketches.safetensors").items():
        if key != "empty":
            client, module = key.split(".", 1)
            sketches.setdefault(int(client), {})[module] = value
    torch.set_rng_state(_load(directory / "rng.safetensors")["torch_rng_state"])
    return Checkpoint(last, state, history, method_state, sketches)
