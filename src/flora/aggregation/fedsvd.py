"""FedSVD: clients train B over the global A; the server re-factors the average through an SVD,
so the next round's A is orthonormal and adapts.

Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA",
NeurIPS 2025, arXiv:2505.12805 (code: seanie12/fed-svd).

Per module, one global LoRA (A, B), equal ranks. Every client trains B over the global A (A
frozen, as FFA-LoRA); ``aggregate`` averages B = sum_k p_k s_k B_k over the shared A, exactly
(B A = sum_k p_k s_k B_k A). The life (:class:`Refactored`) then takes the thin SVD of B A
(U S Vh, from the factors, never an out x in matrix) and keeps A' = Vh[:r] (orthonormal rows)
and B' = U[:, :r] S[:r]: rank(B A) <= r, so B' A' = B A to the fp32 floor and the next round
trains B over the principal directions of the update so far. Bytes up: r out (B); bytes down:
r (out + in), both factors (A changes every round, unlike FFA-LoRA's seeded A).

Choices: the re-factoring happens after any client-level noise on the average (it is
post-processing of the noised mean, so the privacy guarantee carries over, as in the paper's
DP setting); round 1 starts from PEFT's init (Kaiming-uniform A, B zero), orthonormal from
round 2 on. Where B A has fewer than r non-zero singular values, the extra rows of A' are still
orthonormal (the SVD's) with zero columns of B'. flora's `flora aggregate` gives the averaged
pair (B, A) itself, whose product is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.ffa_lora import average_B_module
from flora.aggregation.lifecycle import BOTH, GlobalLora, State, Step
from flora.aggregation.lowrank import lowrank_svd
from flora.aggregation.validate import check_equal_ranks, check_shared_A
from flora.factors import Adapter, LoraFactors, adapter_to_tensors

__all__ = ["LIFECYCLE", "Refactored", "aggregate", "orthonormal_refactor"]


def orthonormal_refactor(factors: LoraFactors) -> LoraFactors:
    """``factors`` (scaling 1) as A' = Vh[:r] (orthonormal rows), B' = U[:, :r] S[:r]."""
    U, S, Vh = lowrank_svd(factors.B, factors.A)
    r = factors.rank
    A = Vh[:r].to(factors.A.dtype).contiguous()
    B = (U[:, :r] * S[:r]).to(factors.B.dtype).contiguous()
    return LoraFactors(A, B, 1.0)


@dataclass(frozen=True)
class Refactored(GlobalLora):
    """FFA-LoRA's life (B trained over the global A), the global pair re-factored each round."""

    trains: frozenset[str] = frozenset({"B"})
    sends: frozenset[str] | None = BOTH  # A changes every round: both travel

    def advance(
        self,
        state: State,
        result: AggregationResult,
        round: int,
        ranks: list[int],
        starts: Sequence[Adapter | None] = (),
    ) -> Step:
        lora = {m: orthonormal_refactor(f) for m, f in result.global_factors.items()}
        return Step({**state, "global_lora": adapter_to_tensors(lora)})


LIFECYCLE = Refactored()


def aggregate(clients: Sequence[Adapter], weights: Sequence[float]) -> AggregationResult:
    """Average every module's B over the shared A (the SVD re-factoring is the life's)."""
    check_equal_ranks(clients, "fedsvd")
    check_shared_A(clients, "fedsvd")
    global_factors = {m: average_B_module([c[m] for c in clients], weights) for m in clients[0]}
    down = adapter_bytes(global_factors)
    return AggregationResult(
        method="fedsvd",
        global_factors=global_factors,
        bytes_up=uploads(clients, parts="B"),
        bytes_down=[down] * len(clients),
    )
