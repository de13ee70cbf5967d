"""What every aggregator returns, and the byte accounting they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flora.aggregation.lowrank import all_finite
from flora.factors import Adapter

__all__ = ["AggregationResult", "adapter_bytes", "tensor_bytes", "uploads"]


@dataclass(frozen=True)
class AggregationResult:
    """What the server sends down after one aggregation.

    global_factors: the server's adapter (scaling folded in: every entry has scaling 1).
    client_factors: per-client downloads, for methods that redistribute (zero-padding, flexlora);
        None when every client downloads ``global_factors``.
    residual: dense (out, in) updates to fold into the base weights (fedex-lora), else None.
    bytes_up / bytes_down: per client, what crosses the network for this aggregation.
    weights: the normalised p_k the aggregation used (set by flora.aggregation.aggregate).
    reference: each client's whole update where its upload is a part of it, else None.
    """

    method: str
    global_factors: Adapter
    bytes_up: list[int]
    bytes_down: list[int]
    client_factors: list[Adapter] | None = None
    residual: dict[str, torch.Tensor] | None = None
    weights: list[float] = field(default_factory=list)
    # each client's whole update, where its upload is only part of it (fed-plora: the trained
    # components without the folded ones): what the report's exact average is of
    reference: list[Adapter] | None = None
    clients: list[int] = field(default_factory=list)  # who the uploads came from (a run's ids)

    def download(self, client: int) -> Adapter:
        """The factors client ``client`` receives."""
        if self.client_factors is not None:
            return self.client_factors[client]
        return self.global_factors

    def is_finite(self) -> bool:
        """Whether every tensor of the result is finite (finite inputs can still overflow)."""
        tensors = [t for f in self.global_factors.values() for t in (f.A, f.B)]
        tensors += list((self.residual or {}).values())
        return all(all_finite(t) for t in tensors)

    def realised_delta(self, module: str) -> torch.Tensor:
        """The dense update the server applies for ``module``: B @ A (+ residual), (out, in)."""
        factors = self.global_factors[module]
        delta = factors.delta()
        if self.residual is not None:
            delta = delta + self.residual[module]
        return delta


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def adapter_bytes(adapter: Adapter, *, parts: str = "AB") -> int:
    """Bytes of an adapter's factors; ``parts`` picks "A", "B" or both."""
    total = 0
    for factors in adapter.values():
        if "A" in parts:
            total += tensor_bytes(factors.A)
        if "B" in parts:
            total += tensor_bytes(factors.B)
    return total


def uploads(clients: Sequence[Adapter], parts: str = "AB") -> list[int]:
    """Bytes each client sends up."""
    return [adapter_bytes(client, parts=parts) for client in clients]
