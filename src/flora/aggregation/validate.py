"""Input checks that run before any aggregation maths.

Every failure raises FloraError naming the client (0-based, in the order given), the module and
the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flora.aggregation.lowrank import all_finite
from flora.errors import FloraError
from flora.factors import Adapter

__all__ = [
    "check_clients",
    "check_equal_ranks",
    "check_module",
    "check_shared_A",
    "normalize_weights",
    "not_finite",
]


def normalize_weights(weights: Sequence[float] | None, num_clients: int) -> list[float]:
    """p_k = w_k / sum w; equal weights when ``weights`` is None."""
    if num_clients < 1:
        raise FloraError("no clients to aggregate: pass at least one adapter")
    if weights is None:
        return [1.0 / num_clients] * num_clients
    values = [float(w) for w in weights]
    if len(values) != num_clients:
        raise FloraError(
            f"weights: {len(values)} given for {num_clients} clients; give one weight per client"
        )
    for index, value in enumerate(values):
        if not math.isfinite(value) or value <= 0:
            raise FloraError(
                f"weights: client {index} has weight {value}; weights must be positive and finite "
                "(use example counts, or omit them for equal weights)"
            )
    total = sum(values)
    return [value / total for value in values]


def check_clients(clients: Sequence[Adapter], values: bool = True) -> None:
    """Same module set, shapes that fit each module's rank and each other, finite values (unless
    ``values`` is false: for a method that checks them in its own pass over the bytes)."""
    if not clients:
        raise FloraError("no clients to aggregate: pass at least one adapter")
    reference = clients[0]
    if not reference:
        raise FloraError("client 0 has no LoRA modules; is it a LoRA adapter?")
    for index, client in enumerate(clients):
        missing = sorted(set(reference) - set(client))
        extra = sorted(set(client) - set(reference))
        if missing or extra:
            detail = f"lacks '{missing[0]}'" if missing else f"has extra module '{extra[0]}'"
            raise FloraError(
                f"client {index} {detail} ({len(missing)} missing, {len(extra)} extra vs client "
                "0); every client must adapt the same target modules"
            )
        for module, factors in client.items():
            check_module(index, module, factors.A, factors.B, factors.scaling, values)
            ref = reference[module]
            if (factors.in_features, factors.out_features) != (ref.in_features, ref.out_features):
                raise FloraError(
                    f"client {index}, module '{module}': layer is {factors.out_features}x"
                    f"{factors.in_features} but client 0 has {ref.out_features}x{ref.in_features}; "
                    "all clients must fine-tune the same base model"
                )


def not_finite(index: int, module: str, name: str) -> FloraError:
    """The error for client ``index``'s ``name`` (lora_A or lora_B) of ``module`` holding NaN or
    inf."""
    return FloraError(
        f"client {index}, module '{module}': {name} holds NaN or inf; the client's training "
        "diverged: drop or retrain it"
    )


def check_module(
    index: int, module: str, A: torch.Tensor, B: torch.Tensor, s: float, values: bool = True
) -> None:
    """One module's factors: matrices of one rank >= 1, a positive finite scaling, floating
    point, finite values (with ``values``); a FloraError naming client ``index`` and the module
    otherwise."""
    where = f"client {index}, module '{module}'"
    if A.ndim != 2 or B.ndim != 2:
        raise FloraError(f"{where}: lora_A and lora_B must be matrices; got {A.ndim}-D, {B.ndim}-D")
    if A.shape[0] != B.shape[1] or A.shape[0] < 1:
        raise FloraError(
            f"{where}: lora_A is {tuple(A.shape)} and lora_B is {tuple(B.shape)}; A must be "
            "(r, in) and B (out, r) with the same r >= 1"
        )
    if not math.isfinite(s) or s <= 0:
        raise FloraError(f"{where}: scaling {s} must be positive and finite (check lora_alpha)")
    for name, tensor in (("lora_A", A), ("lora_B", B)):
        if not tensor.is_floating_point():
            raise FloraError(f"{where}: {name} has dtype {tensor.dtype}; expected floating point")
        if values and not all_finite(tensor):
            raise not_finite(index, module, name)


def check_equal_ranks(clients: Sequence[Adapter], method: str) -> None:
    """Methods that average A and B entrywise need every client at the same rank per module."""
    for module, ref in clients[0].items():
        for index, client in enumerate(clients[1:], start=1):
            if client[module].rank != ref.rank:
                raise FloraError(
                    f"{method} needs equal ranks: client {index}, module '{module}' has rank "
                    f"{client[module].rank} but client 0 has {ref.rank}; use flora, florist, "
                    "flexlora or zero-padding for mixed ranks"
                )


def check_shared_A(clients: Sequence[Adapter], method: str) -> None:
    """FFA-LoRA's precondition: one frozen A, identical on every client."""
    for module, ref in clients[0].items():
        for index, client in enumerate(clients[1:], start=1):
            if not torch.equal(client[module].A, ref.A):
                raise FloraError(
                    f"{method} needs the same frozen lora_A on every client: client {index}, "
                    f"module '{module}' differs from client 0; initialise A from the shared seed "
                    "and freeze it"
                )
