"""The attack harness: hostile clients every round, injected from the outside (tests/faults).

``arm(attack)`` wraps ``flora.client.client_round`` (as tamper.py does) so that every upload of the
attack's clients, every round, is what ``attack.factor`` makes of it: each factor the client
trains moves ``factor`` times as far from where it started as training moved it,
X' = X_0 + factor (X - X_0). A fresh LoRA starts from B_0 = 0, so FLoRA's update s B A becomes
exactly ``factor`` times the honest one (factor -1: a sign flip of honest norm); for the methods
whose clients start from a global LoRA, both trained factors move (a scaled step, as an attacker
that knows the protocol would send). Colluders are several clients sending their own scaled
updates in the same round. ``damage`` compares two runs' final merged updates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tests.faults.tamper import _install

import flora.client
from flora.client import ClientResult
from flora.factors import LoraFactors
from flora.protocol import ClientTask

__all__ = ["Attack", "arm", "damage", "update_norm_of"]


@dataclass(frozen=True)
class Attack:
    name: str
    clients: tuple[int, ...]  # the partitions that attack, every round
    factor: float  # X' = X_0 + factor (X - X_0) for each trained factor


def _moved(
    upload: LoraFactors, start: LoraFactors | None, parts: frozenset[str], c: float
) -> LoraFactors:
    if start is None:  # a fresh LoRA: B_0 = 0, so scaling B scales the whole update
        return LoraFactors(upload.A, upload.B * c, upload.scaling)
    start = start.with_scaling(upload.scaling)  # as the client loaded it
    A = start.A + c * (upload.A - start.A) if "A" in parts else upload.A
    B = start.B + c * (upload.B - start.B) if "B" in parts else upload.B
    return LoraFactors(A, B, upload.scaling)


def attacked(result: ClientResult, task: ClientTask, factor: float) -> ClientResult:
    """The result with every trained factor moved ``factor`` times as far from its start."""
    assert result.factors is not None, result.error
    init = task.init or {}
    factors = {m: _moved(f, init.get(m), task.changes, factor) for m, f in result.factors.items()}
    return dataclasses.replace(result, factors=factors)


def arm(attack: Attack) -> Callable[[], None]:
    """Install the attack on both runtimes' ``client_round``; returns what undoes it."""
    real = flora.client.client_round

    def hostile(base: Any, data: Any, task: ClientTask, config: Any, **kwargs: Any) -> ClientResult:
        result = real(base, data, task, config, **kwargs)
        if kwargs.get("train", True) and task.client in attack.clients and result.factors:
            return attacked(result, task, attack.factor)
        return result

    return _install(hostile)


def _targets(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in tensors.items() if any(f".{n}." in k for n in names)}


def merged_update(run_dir: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """The run's whole merged update of the target modules: final model minus base."""
    model = _targets(load_file(run_dir / "final" / "model" / "model.safetensors"), modules)
    base = _targets(load_file(run_dir / "final" / "base" / "model.safetensors"), modules)
    return {k: model[k] - base[k] for k in model}


def update_norm_of(update: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v * v).sum() for v in update.values())))


def damage(run_dir: Path, honest_dir: Path, modules: list[str]) -> float:
    """||U_run - U_honest||_F / ||U_honest||_F over the target modules' final merged updates."""
    ours, honest = merged_update(run_dir, modules), merged_update(honest_dir, modules)
    diff = {k: ours[k] - honest[k] for k in honest}
    return update_norm_of(diff) / update_norm_of(honest)
