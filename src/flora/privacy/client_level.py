"""Client-level DP for the methods that average one global LoRA (DP-FedAvg's pieces).

McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018
(arXiv:1710.06963); the split of the work is that of Flower's
``DifferentialPrivacyClientSideFixedClipping``: the client clips, so the server never needs the
unclipped update, and the server adds the noise.

A client's update is its trained factors minus the global LoRA it started from, in the form the
server averages (scaling 1: A and s_k B_k; B alone where A is frozen), all modules as one
vector. :func:`clip_update` scales it to L2 norm at most S and uploads start + clipped update;
the server averages the uploads with equal weights 1/m, so one client moves the mean by at
most S/m, and :func:`noise_average` adds N(0, (sigma S / m)^2) to every averaged coordinate.
Pure tensor maths: no models, files or networks.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Collection

import torch

from flora.factors import Adapter, LoraFactors

__all__ = ["clip_update", "noise_average", "noise_generator", "update_norm"]


def _deltas(
    trained: Adapter, start: Adapter, trains: Collection[str]
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per module, the change of each trained part at scaling 1 (None: the part did not train)."""
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    for module in sorted(start):
        t, s = trained[module].with_scaling(1.0), start[module].with_scaling(1.0)
        delta_A = t.A.float() - s.A.float() if "A" in trains else None
        delta_B = t.B.float() - s.B.float() if "B" in trains else None
        out[module] = (delta_A, delta_B)
    return out


def update_norm(trained: Adapter, start: Adapter, trains: Collection[str] = "AB") -> float:
    """The L2 norm of the update over every module's trained parts (``trains``: "A", "B"), at
    scaling 1."""
    total = 0.0
    for deltas in _deltas(trained, start, trains).values():
        total += sum(float(d.double().square().sum()) for d in deltas if d is not None)
    return math.sqrt(total)


def clip_update(
    trained: Adapter, start: Adapter, bound: float, trains: Collection[str] = "AB"
) -> tuple[Adapter, float]:
    """``start`` + the update scaled onto L2 norm <= ``bound`` (scaling 1), and the update's
    norm before clipping. A part that did not train is the trained one, untouched."""
    norm = update_norm(trained, start, trains)
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    clipped: Adapter = {}
    for module, (delta_A, delta_B) in _deltas(trained, start, trains).items():
        s, t = start[module].with_scaling(1.0), trained[module]
        A = t.A.float() if delta_A is None else s.A.float() + factor * delta_A
        B = t.with_scaling(1.0).B.float() if delta_B is None else s.B.float() + factor * delta_B
        clipped[module] = LoraFactors(A.contiguous(), B.contiguous(), 1.0)
    return clipped, norm


def noise_generator(seed: int, round: int, reproducible: bool) -> torch.Generator:
    """The server's noise source for ``round``: from (seed, round) with ``reproducible``, else a
    secret seed (the clients know the run's seed and could subtract noise drawn from it)."""
    value = (
        (seed * 1_000_003 + round * 7_919 + 17) % (2**63 - 1)
        if reproducible
        else secrets.randbits(63)
    )
    return torch.Generator().manual_seed(value)


def noise_average(
    average: Adapter, std: float, generator: torch.Generator, trains: Collection[str] = "AB"
) -> Adapter:
    """``average`` (scaling 1) with N(0, std^2) added to every coordinate of the parts that
    trained (``trains``); a part that did not train is the same for every client and carries no
    client's data. B's noise is drawn after A's, module by module."""
    noised: Adapter = {}
    for module in sorted(average):
        f = average[module].with_scaling(1.0)
        A, B = f.A, f.B
        if "A" in trains:
            A = A + std * torch.randn(A.shape, generator=generator, dtype=A.dtype)
        if "B" in trains:
            B = B + std * torch.randn(B.shape, generator=generator, dtype=B.dtype)
        noised[module] = LoraFactors(A, B, 1.0)
    return noised
