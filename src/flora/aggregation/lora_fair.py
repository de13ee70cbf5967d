"""LoRA-FAIR: FedIT's averages, with B corrected on the server so that the pair's product
approaches the exact aggregate; clients continue from the corrected pair.

Bian, Wang, Zhang and Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025, arXiv:2411.14961.

Per module, equal ranks: A = sum_k p_k A_k and B = sum_k p_k s_k B_k as FedIT, then
B' = B + dB with

    dB = argmin ||(B + dB) A - D||_F^2 + lambda' ||dB||_F^2,   D = sum_k p_k s_k B_k A_k,

in closed form B' = (D A^T + lambda' B)(A A^T + lambda' I)^-1, where D A^T = sum_k p_k s_k B_k
(A_k A^T) comes from the factors (no out x in matrix) and lambda' = lambda tr(A A^T) / r (so
``lam`` does not depend on the scale of A). lambda = 0 is the least-squares correction: B' A is
D projected onto A's row space, the closest any B gets over this A, so its aggregation noise is
at most FedIT's; the larger lambda, the closer B' stays to FedIT's B (lambda -> inf: FedIT).
Bytes up and down, every client: r (out + in), FedIT's.

Choices where the paper leaves room: the paper maximises a similarity between D and (B + dB) A
with a norm penalty on dB, by gradient steps on the server; flora takes the Frobenius distance,
whose minimiser is closed-form and exact (no step size or iteration count to choose), and whose
lambda = 0 case is the least-squares correction. Default ``lam`` = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.fedit import LIFECYCLE, average_module
from flora.aggregation.lowrank import fold
from flora.aggregation.validate import check_equal_ranks
from flora.factors import Adapter, LoraFactors

__all__ = ["LIFECYCLE", "aggregate", "corrected_module"]


def corrected_module(
    factors: Sequence[LoraFactors], weights: Sequence[float], lam: float = 0.0
) -> LoraFactors:
    """FedIT's averaged pair with B corrected towards the exact aggregate (float64 inside)."""
    average = average_module(factors, weights)
    A = average.A.double()  # (r, in)
    target = sum(  # D A^T = sum_k p_k s_k B_k (A_k A^T), (out, r)
        c * f.B.double() @ (f.A.double() @ A.T)
        for c, f in zip(fold(factors, weights), factors, strict=True)
    )
    gram = A @ A.T  # (r, r)
    rank = gram.shape[0]
    ridge = lam * float(torch.trace(gram)) / max(rank, 1)
    eye = torch.eye(rank, dtype=torch.float64)
    if ridge > 0:
        B = torch.linalg.solve(gram + ridge * eye, (target + ridge * average.B.double()).T).T
    else:
        B = target @ torch.linalg.pinv(gram, hermitian=True)
    return LoraFactors(average.A, B.to(average.B.dtype).contiguous(), 1.0)


def aggregate(
    clients: Sequence[Adapter], weights: Sequence[float], *, lam: float = 0.0
) -> AggregationResult:
    """FedIT's averages with every module's B corrected; every client downloads the pair."""
    check_equal_ranks(clients, "lora-fair")
    global_factors = {
        m: corrected_module([c[m] for c in clients], weights, lam) for m in clients[0]
    }
    down = adapter_bytes(global_factors)
    return AggregationResult(
        method="lora-fair",
        global_factors=global_factors,
        bytes_up=uploads(clients),
        bytes_down=[down] * len(clients),
    )
