"""Zero-padding (HetLoRA): pad every client's factors to the largest rank, average, truncate.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024, arXiv:2401.06432.

Computes, per module, A = sum_k w_k pad(A_k) (r_max, in) and B = sum_k w_k s_k pad(B_k)
(out, r_max), scaling 1; client k downloads the truncation A[:r_k], B[:, :r_k]. NOT exact: the
product of padded averages mixes clients' rank components, and truncation drops the rest.
Weights w_k: the given p_k ("examples"), or HetLoRA's sparsity weighting ("norm"), per module
w_k proportional to ||s_k B_k A_k||_F.
Bytes up, client k: r_k (in + out) elements; down, client k: r_k (in + out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.lifecycle import GlobalLora
from flora.aggregation.lowrank import fold, frobenius, truncate
from flora.errors import FloraError
from flora.factors import Adapter, LoraFactors

__all__ = ["LIFECYCLE", "WEIGHTINGS", "aggregate", "norm_weights", "pad_average_module"]

# clients continue from the padded average, truncated to their rank
LIFECYCLE = GlobalLora()

WEIGHTINGS = ("examples", "norm")


def pad_average_module(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """Weighted average of zero-padded factors, at rank r_max."""
    r_max = max(f.rank for f in factors)
    dtype = torch.promote_types(factors[0].A.dtype, torch.float32)
    A = torch.zeros(r_max, factors[0].in_features, dtype=dtype)  # (r_max, in)
    B = torch.zeros(factors[0].out_features, r_max, dtype=dtype)  # (out, r_max)
    for f, p, c in zip(factors, weights, fold(factors, weights), strict=True):
        A[: f.rank].add_(f.A, alpha=p)
        B[:, : f.rank].add_(f.B, alpha=c)
    return LoraFactors(A, B, 1.0)


def norm_weights(factors: Sequence[LoraFactors]) -> list[float]:
    """HetLoRA's sparsity weighting: w_k proportional to ||s_k B_k A_k||_F."""
    norms = [f.scaling * frobenius(f.B, f.A) for f in factors]
    total = sum(norms)
    if total == 0.0:
        return [1.0 / len(factors)] * len(factors)
    return [n / total for n in norms]


def aggregate(
    clients: Sequence[Adapter], weights: Sequence[float], *, weighting: str = "examples"
) -> AggregationResult:
    """Pad, average and truncate every module; client k downloads its own rank."""
    if weighting not in WEIGHTINGS:
        raise FloraError(
            f"zero-padding: weighting '{weighting}' is unknown; use one of {WEIGHTINGS}"
        )
    global_factors: Adapter = {}
    downloads: list[Adapter] = [{} for _ in clients]
    for module in clients[0]:
        factors = [c[module] for c in clients]
        w = norm_weights(factors) if weighting == "norm" else list(weights)
        global_factors[module] = pad_average_module(factors, w)
        for k, f in enumerate(factors):
            downloads[k][module] = truncate(global_factors[module], f.rank)
    return AggregationResult(
        method="zero-padding",
        global_factors=global_factors,
        bytes_up=uploads(clients),
        bytes_down=[adapter_bytes(d) for d in downloads],
        client_factors=downloads,
    )
