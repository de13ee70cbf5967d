"""FFA-LoRA: A frozen and shared by every client (same seed), only B trained and averaged.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
arXiv:2403.12313.

Computes, per module, B = sum_k p_k s_k B_k (out, r) with the shared A (r, in), scaling 1. Exact
given the shared A: B @ A = sum_k p_k s_k B_k A. Equal ranks and identical A are checked.
Because the update is linear in the uploads, it can sit behind secure aggregation.
Bytes up and down, every client: r * out elements (B only; A is regenerated from the seed).

Option ``robust`` = "median" or "trimmed-mean" replaces the weighted mean of the s_k B_k by the
unweighted coordinate-wise estimator of flora.aggregation.robust (still exact given the shared A:
the realised update is the estimate times A).
"""

from __future__ import annotations

from collections.abc import Sequence

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.lifecycle import GlobalLora
from flora.aggregation.lowrank import fold, weighted_sum
from flora.aggregation.robust import TRIM, robust_average
from flora.aggregation.validate import check_equal_ranks, check_shared_A
from flora.factors import Adapter, LoraFactors

__all__ = ["LIFECYCLE", "aggregate", "average_B_module"]

# clients train B over the shared A of the global LoRA, which never changes: only B travels
LIFECYCLE = GlobalLora(trains=frozenset({"B"}))


def average_B_module(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """The shared A with B = sum_k p_k s_k B_k."""
    B = weighted_sum([f.B for f in factors], fold(factors, weights))
    return LoraFactors(factors[0].A.clone(), B, 1.0)


def aggregate(
    clients: Sequence[Adapter],
    weights: Sequence[float],
    *,
    robust: str = "mean",
    trim: float = TRIM,
) -> AggregationResult:
    """Average every module's B over the shared A (or take B's robust estimate)."""
    check_equal_ranks(clients, "ffa-lora")
    check_shared_A(clients, "ffa-lora")
    if robust == "mean":
        global_factors = {m: average_B_module([c[m] for c in clients], weights) for m in clients[0]}
    else:
        global_factors = {
            m: LoraFactors(
                clients[0][m].A.clone(),
                robust_average([c[m].B * c[m].scaling for c in clients], robust, trim),
                1.0,
            )
            for m in clients[0]
        }
    down = adapter_bytes(global_factors, parts="B")
    return AggregationResult(
        method="ffa-lora",
        global_factors=global_factors,
        bytes_up=uploads(clients, parts="B"),
        bytes_down=[down] * len(clients),
    )
