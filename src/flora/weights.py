"""Operations on a base model's weights: the target modules' shapes, merging updates in, and
applying a global LoRA for a while (to evaluate or save the global model).

Every runtime changes base weights through these functions only, so the embedded runtime, the
Flower nodes and the ServerApp's copy add the same updates in the same order, bitwise.

A target module is an ``nn.Linear`` (weight (out, in)) or a GPT-2-style ``Conv1D`` (weight
(in, out)); :func:`module_weight` always returns the (out, in) view, so an update B @ A adds in
the same orientation for both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from transformers.pytorch_utils import Conv1D

from flora.errors import FloraError
from flora.factors import Adapter
from flora.protocol import RoundUpdate

__all__ = [
    "applied",
    "fan_in_fan_out",
    "merge_into_base",
    "merge_update",
    "module_weight",
    "target_shapes",
]


def target_shapes(model: torch.nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer whose leaf name is a target module."""
    shapes = {
        name: (int(module_weight(model, name).shape[0]), int(module_weight(model, name).shape[1]))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | Conv1D) and name.rsplit(".", 1)[-1] in targets
    }
    if not shapes:
        kind = getattr(getattr(model, "config", None), "model_type", "this")
        raise FloraError(
            f"model.target_modules {targets} match no linear layer of the {kind} model; "
            "name its attention projections (e.g. ['q_proj', 'v_proj'] for Llama, Qwen2 and "
            "Gemma, ['c_attn'] for GPT-2)"
        )
    return shapes


def fan_in_fan_out(model: torch.nn.Module, targets: Sequence[str]) -> bool:
    """Whether the target modules store (in, out) weights (GPT-2's Conv1D): peft's flag."""
    return any(
        isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets
        for name, m in model.named_modules()
    )


def module_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The ``.weight`` of module ``name`` as (out, in), detached (callers change it under
    no_grad); for a Conv1D, whose weight is (in, out), the transposed view of the same storage."""
    module = model.get_submodule(name)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach().T if isinstance(module, Conv1D) else weight.detach()


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
        weight = weight.T if isinstance(module, Conv1D) else weight  # (out, in) view
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
