"""FlexLoRA: the weighted sum of full updates, redistributed by truncated SVD to each client's rank.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024, arXiv:2402.11505.

Computes, per module, W = sum_k p_k s_k B_k A_k = U S V^T, and sends client k
B_k' = U[:, :r_k] S[:r_k] (out, r_k), A_k' = V[:, :r_k]^T (r_k, in), scaling 1. The SVD is taken
in the (sum r) space of the stacked factors (see lowrank.lowrank_svd), which gives the same
singular triplets as the paper's dense SVD of W without forming the (out, in) matrix. The global
factors are the truncation at r_max = max_k r_k. NOT exact: client k's download is the best
rank-r_k approximation of W; exact only when rank(W) <= r_k.
Bytes up, client k: r_k (in + out) elements; down, client k: r_k (in + out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.lifecycle import GlobalLora
from flora.aggregation.lowrank import lowrank_svd, stacked, svd_truncate
from flora.factors import Adapter, LoraFactors

__all__ = ["LIFECYCLE", "aggregate", "redistributed", "svd_module"]

# clients continue from the SVD of the exact sum, truncated to their rank
LIFECYCLE = GlobalLora()


def svd_module(
    factors: Sequence[LoraFactors], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD (U, S, Vh) of the exact weighted sum of one module's client updates."""
    exact = stacked(factors, weights)
    return lowrank_svd(exact.B, exact.A)


def aggregate(clients: Sequence[Adapter], weights: Sequence[float]) -> AggregationResult:
    """SVD every module's exact sum; client k downloads its rank-r_k truncation."""
    return redistributed(clients, weights, stacked, "flexlora")


def redistributed(
    clients: Sequence[Adapter],
    weights: Sequence[float],
    summed: Callable[[Sequence[LoraFactors], Sequence[float]], LoraFactors],
    method: str,
) -> AggregationResult:
    """Every module's ``summed`` factors (scaling 1) SVD'd in the small space, the global
    factors truncated at the largest rank, each client's download at its own."""
    global_factors: Adapter = {}
    downloads: list[Adapter] = [{} for _ in clients]
    for module in clients[0]:
        factors = [c[module] for c in clients]
        dtype = torch.promote_types(factors[0].A.dtype, torch.float32)
        whole = summed(factors, weights)
        U, S, Vh = lowrank_svd(whole.B, whole.A)
        global_factors[module] = svd_truncate(U, S, Vh, max(f.rank for f in factors), dtype)
        for k, f in enumerate(factors):
            downloads[k][module] = svd_truncate(U, S, Vh, f.rank, dtype)
    return AggregationResult(
        method=method,
        global_factors=global_factors,
        bytes_up=uploads(clients),
        bytes_down=[adapter_bytes(d) for d in downloads],
        client_factors=downloads,
    )
