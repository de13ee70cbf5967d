"""The FLoRA reference code's FedIT, defect included: for the study's comparison only.

The published ``fed_utils/model_aggregation.py`` (ATP-1010/FederatedLLM, every revision to
January 2025) starts the average from the first client, ``{key: w[key] * p_0}``, and then writes
each further sum into a misspelt ``weighted_sindgle_weights`` that is never read. What reaches the
global model is therefore the first client's adapter with both factors scaled by p_0:
A = p_0 A_0 and B = p_0 B_0 under the clients' scaling s_0, so B @ A = p_0^2 s_0 B_0 A_0, and
every other client's training is thrown away. Clients continue from it, as FedIT's do.

Stored with the scaling folded in (A = p_0 A_0, B = p_0 s_0 B_0, scaling 1), like flora's fedit.
"First" is the first upload in the order given (the reference iterates its set of client ids).
Bytes up and down, every client: r (in + out) elements, as FedIT.
"""

from __future__ import annotations

from collections.abc import Sequence

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.lifecycle import GlobalLora
from flora.aggregation.validate import check_equal_ranks
from flora.factors import Adapter, LoraFactors

__all__ = ["LIFECYCLE", "aggregate", "first_client_module"]

# as the reference code: clients continue from the (defective) global LoRA
LIFECYCLE = GlobalLora()


def first_client_module(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """What the misspelt sum leaves: (p_0 A_0, p_0 s_0 B_0), scaling 1."""
    first, p = factors[0], weights[0]
    return LoraFactors(first.A * p, first.B * (p * first.scaling), 1.0)


def aggregate(clients: Sequence[Adapter], weights: Sequence[float]) -> AggregationResult:
    """The first client's factors times p_0 each; every client downloads them."""
    check_equal_ranks(clients, "reference-fedit")
    global_factors = {m: first_client_module([c[m] for c in clients], weights) for m in clients[0]}
    down = adapter_bytes(global_factors)
    return AggregationResult(
        method="reference-fedit",
        global_factors=global_factors,
        bytes_up=uploads(clients),
        bytes_down=[down] * len(clients),
    )
