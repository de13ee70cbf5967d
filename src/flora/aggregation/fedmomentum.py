"""FedMomentum: the exact aggregate's top components become the next global LoRA (no
re-initialisation), the residual components merge into the base.

Yan et al., "FedMomentum: Preserving LoRA Training Momentum in Federated Fine-Tuning",
arXiv:2603.08014 (2026).

Per module, one global LoRA of rank r (equal ranks). Every client continues from it and trains
A and B; the server forms the exact aggregate D = sum_k p_k s_k B_k A_k by FLoRA's stacking
(``aggregate``: the clients' LoRAs include the global one they started from, so D is the whole
new global update), takes its thin SVD from the stacked factors (U S Vh, no out x in matrix),
keeps the top r components as the next global LoRA and merges the residual components
r+1..n into every base. The global model is then base + merged residuals + the global LoRA, so
with the whole residual merged (``residual = 1``) it equals the weighted average of the
clients' trained models exactly, every round. Bytes up, client k: r (out + in). Bytes down, a
client and round: the global LoRA, r (out + in), plus the merged residual, up to
(K r - r)(out + in) (through the history clients catch up on: it grows with the clients, as
FLoRA's downlink does).

Choices where the paper leaves room (its text: "residual components can be retained and later
merged into the backbone"): flora merges them in the same round (nothing waits on the server,
and the global model stays the exact average); option ``residual`` in (0, 1] merges only the
leading residual components that hold that share of the residual's squared singular values
(the rest is dropped and reported as ``dropped_share``, the update is then not exact); the new
LoRA splits each kept component's singular value evenly, B = U sqrt(S), A = sqrt(S) Vh, so
neither factor starts at zero or dominates (LoRA-GA / PiSSA's balanced split; option
``split = "svd"`` gives B = U S, A = Vh instead, FlexLoRA's and flora-warm's form, with A's
rows orthonormal as a fresh LoRA's scale). `flora aggregate`
writes the exact aggregate itself (the stack); its split into a global LoRA and a merged residual
belongs to a run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flora.aggregation import flora as stacking
from flora.aggregation.base import AggregationResult
from flora.aggregation.lifecycle import GlobalLora, State, Step
from flora.aggregation.lowrank import lowrank_svd, numerical_rank
from flora.aggregation.validate import check_equal_ranks
from flora.factors import Adapter, LoraFactors, adapter_to_tensors

__all__ = ["LIFECYCLE", "Momentum", "aggregate", "split"]


def aggregate(
    clients: Sequence[Adapter],
    weights: Sequence[float],
    *,
    residual: float = 1.0,
    split: str = "balanced",
) -> AggregationResult:
    """The exact aggregate sum_k p_k s_k B_k A_k, FLoRA's stacking (``residual`` and ``split``
    shape what the round keeps and merges, :class:`Momentum`'s, not this sum)."""
    check_equal_ranks(clients, "fedmomentum")
    return dataclasses.replace(stacking.aggregate(clients, weights), method="fedmomentum")


def split(
    factors: LoraFactors, rank: int, residual: float = 1.0, balanced: bool = True
) -> tuple[LoraFactors, LoraFactors | None, float, float]:
    """(the top-``rank`` components as a LoRA, balanced or as the SVD's U S and Vh, the
    residual components merged, the squared norm dropped, the squared norm of the whole) of
    ``factors`` (scaling 1)."""
    U, S, Vh = lowrank_svd(factors.B, factors.A)
    n = numerical_rank(S)
    left = S[:rank].sqrt() if balanced else torch.ones_like(S[:rank])
    right = S[:rank] / left
    top = LoraFactors(
        (left[:, None] * Vh[:rank]).float().contiguous(),
        (U[:, :rank] * right).float().contiguous(),
        1.0,
    )
    energy = S[rank:n].double().square()
    total = float(S[:n].double().square().sum())
    if not energy.numel():
        return top, None, 0.0, total
    shares = energy.cumsum(0) / energy.sum()
    keep = energy.numel() if residual >= 1 else int((shares < residual - 1e-12).sum()) + 1
    merged = LoraFactors(
        Vh[rank : rank + keep].float().contiguous(),
        (U[:, rank : rank + keep] * S[rank : rank + keep]).float().contiguous(),
        1.0,
    )
    return top, merged, float(energy[keep:].sum()), total


@dataclass(frozen=True)
class Momentum(GlobalLora):
    """The global LoRA from the top components of each round's exact aggregate; the residual
    merged into the base (see the module docstring)."""

    residual: float = 1.0  # share of the residual's energy merged each round (1: all, exact)
    split: str = "balanced"  # "balanced": U sqrt(S), sqrt(S) Vh; "svd": U S, Vh

    def advance(
        self,
        state: State,
        result: AggregationResult,
        round: int,
        ranks: list[int],
        starts: Sequence[Adapter | None] = (),
    ) -> Step:
        width = max(ranks)
        lora: Adapter = {}
        merged: Adapter = {}
        dropped = total = 0.0
        residual_rank = 0
        for module, aggregate_ in sorted(result.global_factors.items()):
            top, rest, lost, whole = split(
                aggregate_, width, self.residual, self.split == "balanced"
            )
            lora[module] = top
            dropped, total = dropped + lost, total + whole
            if rest is not None:
                merged[module] = rest
                residual_rank = max(residual_rank, rest.rank)
        fields = {
            "residual_rank": residual_rank,
            "dropped_share": math.sqrt(dropped) / max(math.sqrt(total), 1e-30),
        }
        step_state = {**state, "global_lora": adapter_to_tensors(lora)}
        if not merged:
            return Step(step_state, None, None, fields)
        for module, top in lora.items():  # every module merges (a zero component where none)
            if module not in merged:
                merged[module] = LoraFactors(
                    torch.zeros(1, top.in_features), torch.zeros(top.out_features, 1), 1.0
                )
        return Step(step_state, merged, None, fields)


def LIFECYCLE(residual: float = 1.0, split: str = "balanced") -> Momentum:
    """The method's life at its options (flora.aggregation.registry calls it)."""
    return Momentum(residual=residual, split=split)
