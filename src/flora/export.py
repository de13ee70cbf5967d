"""A run's whole learned update as one PEFT LoRA over its original base.

Merging methods (flora, florist, fedex-lora) fold every round's update into the base, so they end
with no adapter of their own; the cumulative update is the sum of the rounds' low-rank factors
(plus fedex-lora's dense residuals, plus a global LoRA where the method keeps one). It is
re-factored exactly: the stacked factors' thin SVD (``lowrank_svd``, never the dense matrix)
cut at its numerical rank, or, with a residual, the dense update's SVD. Applied to the
original base with ``PeftModel.from_pretrained``, the adapter gives ``final/model``'s weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.aggregation.lowrank import exact_refactor, numerical_rank, stack, svd_truncate
from flora.factors import Adapter, LoraFactors
from flora.protocol import RoundUpdate

__all__ = ["cumulative_adapter"]


def cumulative_adapter(history: Sequence[RoundUpdate], lora: Adapter | None) -> Adapter | None:
    """sum_t (B_t A_t + R_t) + s B A of the global LoRA, per module, as factors of scaling 1
    at the numerical rank; None when there is nothing (no rounds merged and no global LoRA)."""
    if not history:
        return lora
    factors: Adapter = {}
    for module in history[0].factors:
        terms = [u.factors[module] for u in history]
        if lora is not None:
            terms.append(lora[module])
        A, B = stack([t.A for t in terms], [t.B for t in terms], [t.scaling for t in terms])
        residuals = [u.residual[module] for u in history if u.residual is not None]
        if residuals:
            factors[module] = _dense_refactor(
                B.double() @ A.double() + sum(r.double() for r in residuals)
            )
        else:
            factors[module] = exact_refactor(B, A, torch.float32)
    return factors


def _dense_refactor(delta: torch.Tensor) -> LoraFactors:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return svd_truncate(U, S, Vh, numerical_rank(S), torch.float32)
