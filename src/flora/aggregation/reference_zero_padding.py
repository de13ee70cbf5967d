"""The FLoRA reference code's zero-padding, defects included: for the study's comparison only.

The published ``fed_utils/model_aggregation.py`` (ATP-1010/FederatedLLM) pads each client's A_k
(rows) and B_k (columns) to the largest rank and multiplies *both* by p_k before summing, so the
merged product (sum_k p_k pad B_k)(sum_k p_k pad A_k) carries each client's own term with p_k^2
(and cross terms p_j p_k B_j A_k between clients). HetLoRA (flora's ``zero-padding``) averages
the factors too, but its clients continue training from them; here ``main.py`` merges the
product into the base and the clients start fresh LoRAs, so the shrinkage is never trained back.
The merge also runs under
a LoRA config of r = max(ranks) and lora_alpha = 32 * max(ranks): a scaling of 32, where the
clients trained with alpha = 2 r, a scaling of 2 (the revisions up to October 2024; later ones
moved that config where the zero-padding run no longer reaches it).

Computes, per module, A = sum_k p_k pad(A_k) (r_max, in) and B = m sum_k p_k s_k pad(B_k)
(out, r_max), scaling 1, where m = ``merge_scaling`` is the merge's scaling over the clients'
own (16 as published up to October 2024; 1 keeps only the p_k^2 defect).
Bytes up, client k: r_k (in + out) elements; down, every client: r_max (in + out).
"""

from __future__ import annotations

from collections.abc import Sequence

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.zero_padding import pad_average_module
from flora.factors import Adapter, LoraFactors

__all__ = ["aggregate", "published_module"]


def published_module(
    factors: Sequence[LoraFactors], weights: Sequence[float], merge_scaling: float
) -> LoraFactors:
    """Padded averages of A and of s_k B_k (both weighted by p_k), B times ``merge_scaling``."""
    padded = pad_average_module(factors, weights)
    return LoraFactors(padded.A, padded.B * merge_scaling, 1.0)


def aggregate(
    clients: Sequence[Adapter], weights: Sequence[float], *, merge_scaling: float = 16.0
) -> AggregationResult:
    """Pad, weight both factors by p_k, sum, and merge at ``merge_scaling`` x the clients'."""
    global_factors = {
        m: published_module([c[m] for c in clients], weights, merge_scaling) for m in clients[0]
    }
    down = adapter_bytes(global_factors)
    return AggregationResult(
        method="reference-zero-padding",
        global_factors=global_factors,
        bytes_up=uploads(clients),
        bytes_down=[down] * len(clients),
    )
