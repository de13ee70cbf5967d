"""Robust averages: coordinate-wise median and trimmed mean, for the methods that average factors.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018, arXiv:1803.01498 (both estimators; Flower ships them as FedMedian
and FedTrimmedAvg).

- ``median``: per coordinate, the median of the K clients' values (the mean of the two middle
  ones when K is even). With fewer than half of the clients hostile, each coordinate stays
  within the range of the honest clients' values, whatever the hostile ones send.
- ``trimmed-mean``: per coordinate, drop the floor(trim K) smallest and largest values and average
  the rest; trim = 0 is the plain unweighted mean.

Both ignore the clients' example counts, as the paper's estimators and Flower's strategies do: an
example count is the client's own claim, so a weighted median would hand a hostile client the
weight it claims. Neither is exact: they are estimators of the honest mean, chosen for robustness.
Pure: torch only; memory K x the tensor's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["ROBUST", "TRIM", "coordinate_median", "robust_average", "trimmed_mean"]

ROBUST = ("mean", "median", "trimmed-mean")  # "mean": the method's own weighted average
TRIM = 0.2  # Flower's FedTrimmedAvg default (beta = 0.2)


def _sorted(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return torch.stack([t.to(dtype) for t in tensors]).sort(dim=0).values


def coordinate_median(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median of equally shaped tensors (middle two averaged for even K)."""
    ordered = _sorted(tensors)
    k = len(tensors)
    return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


def trimmed_mean(tensors: Sequence[torch.Tensor], trim: float) -> torch.Tensor:
    """The coordinate-wise mean after dropping floor(trim K) values at each end; 0 <= trim < 0.5."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    k = len(tensors)
    cut = math.floor(trim * k)
    return _sorted(tensors)[cut : k - cut].mean(dim=0)


def robust_average(tensors: Sequence[torch.Tensor], how: str, trim: float) -> torch.Tensor:
    """``how`` = "median" or "trimmed-mean" of the tensors, per coordinate."""
    if how == "median":
        return coordinate_median(tensors)
    if how == "trimmed-mean":
        return trimmed_mean(tensors, trim)
    raise ValueError(f"robust must be 'median' or 'trimmed-mean', got {how!r}")
