"""raFLoRA: FlexLoRA's SVD redistribution with rank-partitioned aggregation weights.

Wu, Hu, Min and Wang, "Preventing Rank Collapse in Federated Low-Rank Adaptation with Client
Heterogeneity", arXiv:2602.13486 (2026).

FlexLoRA (flexlora.py) sums sum_k p_k s_k B_k A_k and sends each client the truncated SVD at its
rank. With mixed ranks, component i of the global LoRA (i > the smallest rank) comes only from
the clients whose rank exceeds i, yet it is weighted by their p_k alone, which sum to less than
1: each round shrinks it by that sum, and after a few rounds the update's energy sits in the
smallest shared rank ("rank collapse", the paper's analysis: geometric suppression of the higher
ranks). raFLoRA partitions the ranks by the clients' rank levels and weights each partition by
the clients that contribute to it, p_k / P_i with P_i = sum_{k: r_k > i} p_k, per module:

    W = sum_k sum_{i < r_k} (p_k s_k / P_i) B_k[:, i] A_k[i, :],

then takes W's SVD (in the (sum r) space, no out x in matrix) and sends client k the top r_k
components, B = U S, A = Vh, as FlexLoRA. Partitions between two consecutive rank levels share
one P_i, so this is the paper's partitioned sum; with equal ranks every P_i = 1 and it is
FlexLoRA's aggregate. NOT exact (by design: the higher partitions are re-weighted, and each
client gets a truncation). Bytes up, client k: r_k (in + out); down: r_k (in + out), as
FlexLoRA.

Choices where the text leaves room (the paper's method section was not reachable here; its
abstract and analysis give the rule above, and an unofficial implementation reads it the same
way): the partitions come from the ranks of the round's clients (with weights renormalised
over the clients covering each partition, a partition between two ranks that no client of the
round has would get the same weights); p_k are the data-size weights, as every flora method;
the client's scaling is folded into B before the sum (s_k differs between ranks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.aggregation.base import AggregationResult
from flora.aggregation.flexlora import redistributed
from flora.aggregation.lifecycle import GlobalLora
from flora.factors import Adapter, LoraFactors

__all__ = ["LIFECYCLE", "aggregate", "partition_weights", "rank_aware_sum"]

# clients continue from the SVD of the rank-aware sum, truncated to their rank (FlexLoRA's life)
LIFECYCLE = GlobalLora()


def partition_weights(ranks: Sequence[int], weights: Sequence[float]) -> torch.Tensor:
    """P_i = sum_{k: r_k > i} p_k for i < max r: the weight of the clients covering row i."""
    covered = torch.zeros(max(ranks), dtype=torch.float64)
    for r, p in zip(ranks, weights, strict=True):
        covered[:r] += p
    return covered


def rank_aware_sum(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """One module's W as stacked factors (scaling 1): row i of client k's A scaled by
    p_k s_k / P_i, B's columns as they are."""
    covered = partition_weights([f.rank for f in factors], weights)
    dtype = torch.promote_types(factors[0].A.dtype, torch.float32)
    rows = []
    for f, p in zip(factors, weights, strict=True):
        coeff = (p * f.scaling / covered[: f.rank]).to(dtype)
        rows.append(f.A.to(dtype) * coeff[:, None])
    return LoraFactors(torch.cat(rows), torch.cat([f.B.to(dtype) for f in factors], dim=1), 1.0)


def aggregate(clients: Sequence[Adapter], weights: Sequence[float]) -> AggregationResult:
    """The rank-aware sum of every module, SVD-redistributed at each client's rank."""
    return redistributed(clients, weights, rank_aware_sum, "raflora")
