"""Operations on a base model's weights: the target modules' shapes, merging updates in, and
applying a global LoRA for a while (to evaluate or save the global model).

Every runtime changes base weights through these functions only, so the embedded runtime, the
Flower nodes and the ServerApp's copy add the same updates in the same order, bitwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from flora.adapters import Adapter
from flora.errors import FloraError
from flora.protocol import RoundUpdate

__all__ = ["applied", "merge_into_base", "merge_update", "module_weight", "target_shapes"]


def target_shapes(model: torch.nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer whose leaf name is a target module."""
    shapes = {
        name: (int(m.weight.shape[0]), int(m.weight.shape[1]))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    if not shapes:
        raise FloraError(f"model.target_modules {targets} match no linear layer of the model")
    return shapes


def module_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The ``.weight`` of module ``name`` (detached: callers change it under no_grad)."""
    weight = model.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach()


def merge_into_base(model: torch.nn.Module, delta: dict[str, torch.Tensor]) -> None:
    """Add dense updates (out, in) into the named modules' ``.weight`` in place, in fp32.

    Every name and shape is checked before any weight changes. A module whose weight is tied
    (e.g. lm_head with tied embeddings) changes its twin too.
    """
    targets: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, update in delta.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise FloraError(
                f"merge: the model has no module '{name}'; check the adapter keys"
            ) from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise FloraError(f"merge: module '{name}' has no weight tensor to update")
        if tuple(update.shape) != tuple(weight.shape):
            raise FloraError(
                f"merge: delta for '{name}' is {tuple(update.shape)} but the weight is "
                f"{tuple(weight.shape)}; give (out, in) = B @ A"
            )
        if not torch.isfinite(update).all():
            raise FloraError(f"merge: delta for '{name}' holds NaN or inf; check the aggregation")
        targets.append((weight, update))
    with torch.no_grad():
        for weight, update in targets:
            merged = weight.float() + update.to(device=weight.device, dtype=torch.float32)
            weight.copy_(merged.to(weight.dtype))


def merge_update(model: torch.nn.Module, update: RoundUpdate) -> None:
    """W += B @ A (+ residual) for every module of one round's merged update."""
    merge_into_base(model, update.deltas())


@contextlib.contextmanager
def applied(model: torch.nn.Module, lora: Adapter | None) -> Iterator[None]:
    """The base with ``lora`` merged in, restored bitwise afterwards (to evaluate a global LoRA)."""
    if lora is None:
        yield
        return
    saved = {m: module_weight(model, m).clone() for m in lora}
    merge_into_base(model, {m: f.delta() for m, f in lora.items()})
    try:
        yield
    finally:
        with torch.no_grad():
            for module, weight in saved.items():
                module_weight(model, module).copy_(weight)
