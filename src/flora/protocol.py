"""The round protocol's pure parts: what a client is sent (ClientTask), one round's merged update
(RoundUpdate) and its tensor codec, client sampling, the initial global LoRA, and catch-up.

Methods that merge each round's update into the base weights (flora, florist, fedex-lora) need
every client's base to equal the server's before it trains: a client that missed rounds first
downloads what it missed, either each missed update as sent ("replay") or all of them re-factored
into one exact low-rank pair ("svd": the thin SVD of the stacked missed factors, numerical rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flora import wire
from flora.aggregation.base import tensor_bytes
from flora.aggregation.lifecycle import BOTH, initial_lora, moving
from flora.aggregation.lowrank import exact_refactor, stack
from flora.errors import FloraError
from flora.factors import Adapter, LoraFactors, adapter_to_tensors, pair_factors

__all__ = [
    "ClientTask",
    "RoundUpdate",
    "apply_to_sketch",
    "catch_up",
    "client_seed",
    "initial_lora",
    "sample_clients",
    "sketch_drift",
    "sketch_probes",
]


@dataclass(frozen=True)
class RoundUpdate:
    """One round's merged update: W += B @ A (+ residual) for every module.

    ``wire`` is the number format its factors travel in (:mod:`flora.wire`); in memory they are
    fp32 values on that format's grid, so the server and every client merge the same numbers."""

    round: int
    factors: Adapter  # scaling 1
    residual: dict[str, torch.Tensor] | None = None
    wire: str = "fp32"

    def nbytes(self) -> int:
        """The bytes it travels in: its factors at ``wire`` and any residual."""
        residual = sum(tensor_bytes(t) for t in (self.residual or {}).values())
        return sum(wire.nbytes(f, self.wire) for f in self.factors.values()) + residual

    def deltas(self) -> dict[str, torch.Tensor]:
        """The dense update of every module: B @ A (+ residual), (out, in)."""
        out = {m: f.delta() for m, f in self.factors.items()}
        for module, residual in (self.residual or {}).items():
            out[module] = out[module] + residual
        return out

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat named tensors: the factors at ``wire`` (flora.factors' codec; int8's exponents
        under ``exponent.<module>.lora_A`` / ``.lora_B``) and ``residual.<module>``."""
        if self.wire == "fp32":
            tensors = adapter_to_tensors(self.factors, prefix)
        else:
            tensors = {}
            for module, factors in self.factors.items():
                parts = wire.encode(factors, self.wire)
                for part in ("A", "B"):
                    tensors[f"{prefix}{module}.lora_{part}.weight"] = parts[part]
                    if f"{part}_exp" in parts:
                        tensors[f"{prefix}{_EXP}{module}.lora_{part}"] = parts[f"{part}_exp"]
        for module, residual in (self.residual or {}).items():
            tensors[f"{prefix}{_RESIDUAL}{module}"] = residual.contiguous()
        return tensors

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], round: int, prefix: str = "") -> RoundUpdate:
        """The update :meth:`to_tensors` wrote under ``prefix`` (its format read from the
        tensors' dtypes)."""
        tag, exp = f"{prefix}{_RESIDUAL}", f"{prefix}{_EXP}"
        residual = {k[len(tag) :]: v for k, v in tensors.items() if k.startswith(tag)}
        exponents = {k[len(exp) :]: v for k, v in tensors.items() if k.startswith(exp)}
        rest = {k: v for k, v in tensors.items() if not k.startswith((tag, exp))}
        parts = pair_factors(rest, prefix, "round update")
        if not parts:
            raise FloraError(f"round update holds no factors under '{prefix}'; check the sender")
        factors: Adapter = {}
        for module in sorted(parts):
            pair = dict(parts[module])
            for part in ("A", "B") if wire.format_of(pair["A"]) == "int8" else ():
                key = f"{module}.lora_{part}"
                if key not in exponents:
                    raise FloraError(f"round update: int8 factors '{key}' have no exponents")
                pair[f"{part}_exp"] = exponents[key]
            factors[module] = wire.decode(pair)
        fmt = wire.format_of(next(iter(parts.values()))["A"])
        return RoundUpdate(round, factors, residual or None, fmt)


_RESIDUAL, _EXP = "residual.", "exponent."


@dataclass
class ClientTask:
    """What the server sends one sampled client for one round (Server.configure)."""

    client: int
    round: int
    rank: int
    alpha: float
    seed: int
    init: Adapter | None = None  # starting factors at scaling 1 (None: PEFT's fresh init)
    trains: frozenset[str] = BOTH  # the parts it trains ("A", "B"); the rest come back as sent
    fold: bool = False  # train over the base minus init's B @ A (a warm start of the same model)
    folded: Adapter | None = None  # a LoRA (scaling 1) in its frozen weights while it trains
    core: dict[str, torch.Tensor] | None = None  # trains = {"R"}: the r x r cores to start from
    catch_up: list[RoundUpdate] = field(default_factory=list)  # merged updates it missed
    since: int = 0  # merged updates the client's base holds before the catch-up ...
    through: int = 0  # ... and after it (the server's history length at configure time)
    bytes_down: int = 0

    @property
    def freeze_A(self) -> bool:
        """B trains over a frozen A (FFA-LoRA's plan; what the task's ``trains`` says)."""
        return "A" not in self.trains

    @property
    def changes(self) -> frozenset[str]:
        """The factors its training may change ("A", "B"; a core R changes A)."""
        return moving(self.trains)

    @property
    def frozen(self) -> frozenset[str]:
        """The parts of ``init`` the client must send back unchanged."""
        return BOTH - self.changes if self.init is not None else frozenset()


def client_seed(seed: int, round: int, client: int) -> int:
    """The seed of one client's local round: distinct per (run, round, client), stable on resume."""
    return (seed * 1_000_003 + round * 10_007 + client) % (2**31 - 1)


def sample_clients(
    num_clients: int, fraction: float, min_clients: int, seed: int, round: int
) -> list[int]:
    """max(min_clients, ceil(fraction K)) distinct clients, seeded by (seed, round), sorted."""
    count = min(num_clients, max(min_clients, math.ceil(fraction * num_clients - 1e-9)))
    rng = np.random.default_rng([seed, round])
    return sorted(int(k) for k in rng.choice(num_clients, size=count, replace=False))


def catch_up(missed: Sequence[RoundUpdate], mode: str = "replay") -> tuple[list[RoundUpdate], int]:
    """What a client that missed ``missed`` downloads, and its bytes.

    "replay" sends the updates as they were; "svd" sends one update whose factors are the exact
    re-factoring of all missed factors (and the summed residual), when that is smaller; "auto"
    sends the smallest of those and one dense update (out x in per module: the missed updates
    summed, no factors), which is smaller once the missed ranks outgrow o i / (o + i).
    """
    replay_bytes = sum(update.nbytes() for update in missed)
    if mode == "replay" or len(missed) < 2:
        return list(missed), replay_bytes
    if mode == "auto":
        refactored, size = catch_up(missed, "svd")  # no larger than the replay
        dense_bytes = sum(  # one fp32 (out, in) residual a module, known without forming it
            4 * f.out_features * f.in_features for f in missed[0].factors.values()
        )
        if dense_bytes < size:  # only then is the dense sum formed
            dense = _dense(missed)
            return [dense], dense.nbytes()
        return refactored, size
    factors: Adapter = {}
    for module in missed[0].factors:
        parts = [update.factors[module] for update in missed]
        A, B = stack([p.A for p in parts], [p.B for p in parts], [1.0] * len(parts))
        factors[module] = exact_refactor(B, A, A.dtype)
    residual = None
    if missed[0].residual is not None:
        residual = {m: sum((u.residual or {})[m] for u in missed) for m in missed[0].residual}
    merged = RoundUpdate(missed[-1].round, factors, residual)  # type: ignore[arg-type]
    if merged.nbytes() >= replay_bytes:
        return list(missed), replay_bytes
    return [merged], merged.nbytes()


def _dense(missed: Sequence[RoundUpdate]) -> RoundUpdate:
    """The missed updates summed into one dense residual per module (rank-0 factors)."""
    factors: Adapter = {}
    residual: dict[str, torch.Tensor] = {}
    for module, first in missed[0].factors.items():
        total = torch.zeros(first.out_features, first.in_features, dtype=torch.float64)
        for update in missed:
            total += update.factors[module].delta().double()  # (out, in)
            if update.residual is not None:
                total += update.residual[module].double()
        residual[module] = total.float()
        factors[module] = LoraFactors(
            torch.zeros(0, first.in_features), torch.zeros(first.out_features, 0), 1.0
        )
    return RoundUpdate(missed[-1].round, factors, residual)


def sketch_probes(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """One fixed random probe x_m (in,) per module: a base is summarised by W_m @ x_m (out,)."""
    generator = torch.Generator().manual_seed(seed + 7919)
    return {
        m: torch.randn(shapes[m][1], generator=generator, dtype=torch.float64)
        for m in sorted(shapes)
    }


def apply_to_sketch(
    sketch: dict[str, torch.Tensor], probes: dict[str, torch.Tensor], updates: Sequence[RoundUpdate]
) -> None:
    """What applying ``updates`` to a base does to its sketch: s_m += B (A x_m) (+ R x_m)."""
    for update in updates:
        for module, factors in update.factors.items():
            x = probes[module]
            sketch[module] += factors.B.double() @ (factors.A.double() @ x)
            if update.residual is not None:
                sketch[module] += update.residual[module].double() @ x


def sketch_drift(client: dict[str, torch.Tensor], server: dict[str, torch.Tensor]) -> float:
    """Largest relative gap between a client's base sketch and the server's, over modules."""
    return max(
        float((client[m] - server[m]).norm() / server[m].norm().clamp_min(1e-30)) for m in server
    )
