"""FLoRA: stacking aggregation for heterogeneous-rank LoRA.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024, arXiv:2409.05976.

Computes, per module, A = [p_1 s_1 A_1; ...; p_K s_K A_K] (sum r_k, in) and
B = [B_1 ... B_K] (out, sum r_k), stored with scaling 1, so that

    B @ A = sum_k p_k s_k B_k @ A_k        exactly, for any mix of ranks.

Clients add B @ A into their base weights and start fresh LoRAs for the next round.
Bytes up, client k: r_k (in + out) elements. Bytes down, every client: (sum_k r_k)(in + out):
the downlink grows with the number of clients.
"""

from __future__ import annotations

from collections.abc import Sequence

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.lowrank import fold, stack_finite
from flora.aggregation.validate import not_finite
from flora.factors import Adapter, LoraFactors

__all__ = ["aggregate"]


def _stacked(module: str, factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """One module stacked, its values checked in the same pass (the registry's
    ``checks_values``: flora.aggregation.aggregate skips its own pass over them)."""
    A, B, bad = stack_finite([f.A for f in factors], [f.B for f in factors], fold(factors, weights))
    if bad is not None:
        raise not_finite(bad[0], module, f"lora_{bad[1]}")
    return LoraFactors(A, B, 1.0)


def aggregate(clients: Sequence[Adapter], weights: Sequence[float]) -> AggregationResult:
    """Stack every module; every client downloads the same global factors."""
    global_factors = {m: _stacked(m, [c[m] for c in clients], weights) for m in clients[0]}
    down = adapter_bytes(global_factors)
    return AggregationResult(
        method="flora",
        global_factors=global_factors,
        bytes_up=uploads(clients),
        bytes_down=[down] * len(clients),
    )
