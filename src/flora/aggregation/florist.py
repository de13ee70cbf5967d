"""FLoRIST: stacking, then singular value thresholding in the small stacked space.

Ramesh and Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated
Fine-Tuning of Large Language Models", 2025, arXiv:2506.09199.

Computes, per module, the stacked factors of FLoRA (B_s A_s = sum_k p_k s_k B_k A_k), their thin
SVD through QRs of B_s and A_s^T and an (sum r) x (sum r) core (the (out, in) matrix is never
formed), and keeps the smallest rank k whose energy share reaches tau:
    energy(k) = sum_{i<=k} e_i / sum_i e_i, with e_i = sigma_i ("sum", default) or sigma_i^2
    ("squared", the Frobenius share).
Global factors B = U_k S_k (out, k), A = V_k^T (k, in), scaling 1, sent to every client.
Exact at tau = 1 (every non-zero singular value kept); below 1, the error is the dropped tail.
Bytes up, client k: r_k (in + out) elements; down, every client: k (in + out) per module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.flexlora import svd_module
from flora.aggregation.lowrank import svd_truncate
from flora.errors import FloraError
from flora.factors import Adapter

__all__ = ["ENERGIES", "aggregate", "threshold_rank"]

ENERGIES = ("sum", "squared")
_TOLERANCE = 1e-12  # energy shares this close to tau count as reaching it (float64 round-off)


def threshold_rank(S: torch.Tensor, tau: float, energy: str = "sum") -> int:
    """The smallest k with energy share >= tau (at least 1; tau = 1 keeps all non-zero values)."""
    values = S.double() if energy == "sum" else S.double() ** 2
    total = float(values.sum())
    if total == 0.0:
        return 1
    share = torch.cumsum(values, 0) / total
    k = int(torch.searchsorted(share, torch.tensor(tau - _TOLERANCE, dtype=share.dtype))) + 1
    nonzero = int((S > 0).sum())
    return max(1, min(k, nonzero))


def aggregate(
    clients: Sequence[Adapter],
    weights: Sequence[float],
    *,
    tau: float = 0.9,
    energy: str = "sum",
) -> AggregationResult:
    """Threshold every module's stacked SVD; every client downloads the same global factors."""
    if not 0.0 < tau <= 1.0:
        raise FloraError(f"florist: tau={tau} is out of range; pick 0 < tau <= 1 (1 is exact)")
    if energy not in ENERGIES:
        raise FloraError(f"florist: energy '{energy}' is unknown; use one of {ENERGIES}")
    global_factors: Adapter = {}
    for module in clients[0]:
        factors = [c[module] for c in clients]
        dtype = torch.promote_types(factors[0].A.dtype, torch.float32)
        U, S, Vh = svd_module(factors, weights)
        global_factors[module] = svd_truncate(U, S, Vh, threshold_rank(S, tau, energy), dtype)
    down = adapter_bytes(global_factors)
    return AggregationResult(
        method="florist",
        global_factors=global_factors,
        bytes_up=uploads(clients),
        bytes_down=[down] * len(clients),
    )
