"""Hostile or broken clients, injected from the outside (flora's src/ holds no test hooks).

``tamper(partition, round, change)`` wraps ``flora.client.client_round`` so that partition's
result in that round passes through ``change`` before it is returned: the embedded runtime and
the Flower apps (the in-process grid) both upload what ``change`` made of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

import flora.client
import flora.simulation
from flora.client import ClientResult
from flora.factors import LoraFactors

Change = Callable[[ClientResult], ClientResult]


def tamper(partition: int, round: int, change: Change) -> Callable[[], None]:
    """Patch ``client_round`` where both runtimes call it (``flora.client``, which the Flower
    nodes use, and ``flora.simulation``'s import); returns the function that undoes it."""
    real = flora.client.client_round

    def tampered(base: Any, data: Any, task: Any, config: Any, **kwargs: Any) -> ClientResult:
        result = real(base, data, task, config, **kwargs)
        if kwargs.get("train", True) and (task.client, task.round) == (partition, round):
            return change(result)
        return result

    return _install(tampered)


def _install(replacement: Callable[..., ClientResult]) -> Callable[[], None]:
    """Put ``replacement`` where both runtimes call ``client_round``; return what undoes it."""
    real = flora.client.client_round
    flora.client.client_round = replacement  # type: ignore[assignment]
    flora.simulation.client_round = replacement  # type: ignore[assignment]

    def undo() -> None:
        flora.client.client_round = real  # type: ignore[assignment]
        flora.simulation.client_round = real  # type: ignore[assignment]

    return undo


def _each(result: ClientResult, f: Callable[[LoraFactors], LoraFactors]) -> ClientResult:
    assert result.factors is not None, result.error
    return dataclasses.replace(result, factors={m: f(v) for m, v in result.factors.items()})


def scaled(by: float) -> Change:
    return lambda r: _each(r, lambda f: LoraFactors(f.A, f.B * by, f.scaling))


def extra_rank(more: int) -> Change:
    def grow(f: LoraFactors) -> LoraFactors:
        a = torch.cat([f.A, torch.randn(more, f.in_features) * 1e-3])
        b = torch.cat([f.B, torch.randn(f.out_features, more) * 1e-3], dim=1)
        return LoraFactors(a, b, f.scaling)

    return lambda r: _each(r, grow)


def nan() -> Change:
    def poison(f: LoraFactors) -> LoraFactors:
        b = f.B.clone()
        b[0, 0] = float("nan")
        return LoraFactors(f.A, b, f.scaling)

    return lambda r: _each(r, poison)


def integer() -> Change:
    return lambda r: _each(
        r, lambda f: LoraFactors(f.A.to(torch.int32), f.B.to(torch.int32), f.scaling)
    )


def examples(count: int) -> Change:
    return lambda r: dataclasses.replace(r, examples=count)


def missing_module() -> Change:
    def drop(r: ClientResult) -> ClientResult:
        assert r.factors is not None
        return dataclasses.replace(r, factors=dict(sorted(r.factors.items())[1:]))

    return drop


def raises() -> Change:
    def fail(r: ClientResult) -> ClientResult:
        return dataclasses.replace(r, factors=None, error="RuntimeError: injected (tamper.py)")

    return fail


def inf() -> Change:
    def poison(f: LoraFactors) -> LoraFactors:
        a = f.A.clone()
        a[-1, -1] = float("inf")
        return LoraFactors(a, f.B, f.scaling)

    return lambda r: _each(r, poison)


def narrower_A() -> Change:
    """A of (r, in - 1): the rank matches, the layer does not."""
    return lambda r: _each(r, lambda f: LoraFactors(f.A[:, :-1], f.B, f.scaling))


def crash_in_training(partition: int, round: int) -> Callable[[], None]:
    """That partition's training in that round raises from its first loss, after the LoRA was
    injected into the base (shared, in the embedded runtime); returns what undoes it."""
    import flora.steps  # the step loops call response_loss

    real_round, real_loss = flora.client.client_round, flora.steps.response_loss

    def failing_loss(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected mid-training (tamper.py)")

    def tampered(base: Any, data: Any, task: Any, config: Any, **kwargs: Any) -> ClientResult:
        if not (kwargs.get("train", True) and (task.client, task.round) == (partition, round)):
            return real_round(base, data, task, config, **kwargs)
        flora.steps.response_loss = failing_loss  # type: ignore[assignment]
        try:
            return real_round(base, data, task, config, **kwargs)
        finally:
            flora.steps.response_loss = real_loss

    return _install(tampered)
