"""FedIT: FedAvg of the LoRA factors A and B, separately.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024,
arXiv:2305.05644.

Computes, per module, A = sum_k p_k A_k and B = sum_k p_k s_k B_k (scaling folded into B, stored
with scaling 1). Equal ranks only. NOT exact: B @ A = (sum p_k s_k B_k)(sum p_k A_k) differs from
sum_k p_k s_k B_k A_k by the "aggregation noise"; for two clients with equal scaling s the gap is
s p_1 p_2 (B_1 - B_2)(A_1 - A_2). Clients continue training from the averaged factors.
Bytes up and down, every client: r (in + out) elements.

Option ``robust`` = "median" or "trimmed-mean" replaces both weighted means by the unweighted
coordinate-wise estimator of flora.aggregation.robust (of the A_k and of the s_k B_k), against
clients that send hostile factors.
"""

from __future__ import annotations

from collections.abc import Sequence

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.lifecycle import GlobalLora
from flora.aggregation.lowrank import fold, weighted_sum
from flora.aggregation.robust import TRIM, robust_average
from flora.aggregation.validate import check_equal_ranks
from flora.factors import Adapter, LoraFactors

__all__ = ["LIFECYCLE", "aggregate", "average_module", "robust_module"]

# clients continue from the averaged global LoRA, truncated to their rank
LIFECYCLE = GlobalLora()


def average_module(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """Entrywise weighted means of A and of s_k B_k."""
    A = weighted_sum([f.A for f in factors], weights)
    B = weighted_sum([f.B for f in factors], fold(factors, weights))
    return LoraFactors(A, B, 1.0)


def robust_module(factors: Sequence[LoraFactors], robust: str, trim: float) -> LoraFactors:
    """The coordinate-wise median or trimmed mean of the A_k and of the s_k B_k."""
    A = robust_average([f.A for f in factors], robust, trim)
    B = robust_average([f.B * f.scaling for f in factors], robust, trim)
    return LoraFactors(A, B, 1.0)


def aggregate(
    clients: Sequence[Adapter],
    weights: Sequence[float],
    *,
    robust: str = "mean",
    trim: float = TRIM,
) -> AggregationResult:
    """Average every module's factors (or take their robust estimate); every client downloads
    the result."""
    check_equal_ranks(clients, "fedit")
    if robust == "mean":
        global_factors = {m: average_module([c[m] for c in clients], weights) for m in clients[0]}
    else:
        global_factors = {
            m: robust_module([c[m] for c in clients], robust, trim) for m in clients[0]
        }
    down = adapter_bytes(global_factors)
    return AggregationResult(
        method="fedit",
        global_factors=global_factors,
        bytes_up=uploads(clients),
        bytes_down=[down] * len(clients),
    )
