"""FedEx-LoRA: FedIT's averaged factors plus the exact residual, folded into the base weights.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Large
Language Models", ACL 2025, arXiv:2410.09432.

Computes, per module, A = sum_k p_k A_k, B = sum_k p_k s_k B_k (scaling 1) and the dense residual
R = sum_k p_k s_k B_k A_k - B @ A (out, in). Exact: B @ A + R = sum_k p_k s_k B_k A_k. Equal
ranks only. Bytes up, every client: r (in + out) elements; down: r (in + out) + out * in (the
residual is a full-size matrix).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.aggregation.base import AggregationResult, adapter_bytes, tensor_bytes, uploads
from flora.aggregation.fedit import average_module
from flora.aggregation.lowrank import stacked
from flora.aggregation.validate import check_equal_ranks
from flora.factors import Adapter, LoraFactors

__all__ = ["aggregate", "residual_module"]


def residual_module(
    factors: Sequence[LoraFactors], weights: Sequence[float], averaged: LoraFactors
) -> torch.Tensor:
    """sum_k p_k s_k B_k A_k - B_avg A_avg, (out, in)."""
    exact = stacked(factors, weights).delta()  # (out, sum r) @ (sum r, in) -> (out, in)
    return exact.sub_(averaged.B @ averaged.A)


def aggregate(clients: Sequence[Adapter], weights: Sequence[float]) -> AggregationResult:
    """FedIT averages, plus each module's residual for the base weights."""
    check_equal_ranks(clients, "fedex-lora")
    global_factors: Adapter = {}
    residual: dict[str, torch.Tensor] = {}
    for module in clients[0]:
        factors = [c[module] for c in clients]
        global_factors[module] = average_module(factors, weights)
        residual[module] = residual_module(factors, weights, global_factors[module])
    down = adapter_bytes(global_factors) + sum(tensor_bytes(r) for r in residual.values())
    return AggregationResult(
        method="fedex-lora",
        global_factors=global_factors,
        bytes_up=uploads(clients),
        bytes_down=[down] * len(clients),
        residual=residual,
    )
