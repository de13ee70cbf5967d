"""Low-rank linear algebra shared by the aggregators, the server and the protocol: the scaling
fold, stacking, truncation, and SVDs in the small space.

A product B @ A with B (out, R) and A (R, in) is never formed densely here: its SVD comes from thin
QRs of B and A^T and an (R x R) core, its norm from two (R x R) Gram matrices, in O((out + in) R^2)
instead of O(out in R).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flora.factors import LoraFactors

__all__ = [
    "all_finite",
    "exact_refactor",
    "fold",
    "frobenius",
    "lowrank_svd",
    "numerical_rank",
    "stack",
    "stack_finite",
    "stacked",
    "svd_truncate",
    "truncate",
    "weighted_sum",
]


def fold(factors: Sequence[LoraFactors], weights: Sequence[float]) -> list[float]:
    """The coefficients c_k = p_k s_k that fold each client's weight and scaling together."""
    return [p * f.scaling for f, p in zip(factors, weights, strict=True)]


def stacked(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """FLoRA's stacking of one module: B @ A = sum_k p_k s_k B_k A_k exactly, scaling 1."""
    A, B = stack([f.A for f in factors], [f.B for f in factors], fold(factors, weights))
    return LoraFactors(A, B, 1.0)


def truncate(factors: LoraFactors, rank: int) -> LoraFactors:
    """The first ``rank`` components: A[:rank] (rank, in), B[:, :rank] (out, rank).

    A ``rank`` above the factors' own pads with zero components (the same update).
    """
    if rank <= factors.rank:
        return LoraFactors(factors.A[:rank].clone(), factors.B[:, :rank].clone(), factors.scaling)
    A = torch.zeros(rank, factors.in_features, dtype=factors.A.dtype)  # (rank, in)
    B = torch.zeros(factors.out_features, rank, dtype=factors.B.dtype)  # (out, rank)
    A[: factors.rank] = factors.A
    B[:, : factors.rank] = factors.B
    return LoraFactors(A, B, factors.scaling)


def svd_truncate(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, dtype: torch.dtype
) -> LoraFactors:
    """B = U[:, :r] diag(S[:r]) (out, r), A = Vh[:r] (r, in); zero-padded where r > len(S)."""
    keep = min(rank, S.shape[0])
    A = torch.zeros(rank, Vh.shape[1], dtype=dtype)
    B = torch.zeros(U.shape[0], rank, dtype=dtype)
    A[:keep] = Vh[:keep]
    B[:, :keep] = U[:, :keep] * S[:keep]
    return LoraFactors(A, B, 1.0)


def stack(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], coeffs: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [c_1 A_1; ...; c_K A_K] (sum r, in) and columns [B_1 ... B_K] (out, sum r).

    Then B @ A = sum_k c_k B_k @ A_k. One pass over the bytes: A's blocks multiplied into a
    preallocated output, B by one concatenation (faster than column-block copies).
    """
    total = sum(int(a.shape[0]) for a in As)
    dtype = torch.promote_types(As[0].dtype, torch.float32)
    A = torch.empty(total, As[0].shape[1], dtype=dtype)  # (sum r, in)
    row = 0
    for a, c in zip(As, coeffs, strict=True):
        torch.mul(a, c, out=A[row : row + int(a.shape[0])])
        row += int(a.shape[0])
    B = torch.cat([b.to(dtype) for b in Bs], dim=1)  # (out, sum r); .to is a no-op at dtype
    return A, B


def stack_finite(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], coeffs: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, str] | None]:
    """:func:`stack` with the inputs' values checked for NaN or inf through the outputs (a
    finite sum proves a tensor finite; only a non-finite output is traced back to its client),
    instead of a separate validation pass over every input first. Also returns the first client
    whose input holds NaN or inf, (client, "A" or "B"), or None. (A block c_k A_k that overflows
    though A_k is finite is not an input's fault: it stays in the output, for the caller's check
    of the result.) bench/aggregation.py measures it against a plain copy.
    """
    A, B = stack(As, Bs, coeffs)
    bad = None
    if not all_finite(A):
        bad = next(((k, "A") for k, a in enumerate(As) if not all_finite(a)), None)
    if bad is None and not all_finite(B):
        bad = next(((k, "B") for k, b in enumerate(Bs) if not all_finite(b)), None)
    return A, B, bad


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf: a finite sum proves it (NaN and inf propagate through a sum), in one read
    and no tensor-sized temporary; only a sum that overflows needs the elementwise check."""
    return math.isfinite(float(tensor.sum())) or bool(tensor.isfinite().all())


def weighted_sum(tensors: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """sum_k c_k T_k, accumulated in at least fp32."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    out = torch.zeros(tensors[0].shape, dtype=dtype)
    for tensor, c in zip(tensors, coeffs, strict=True):
        out.add_(tensor, alpha=c)
    return out


def lowrank_svd(
    B: torch.Tensor, A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B @ A without forming it: U (out, k), S (k,), Vh (k, in), k = min(out, in, R).

    B = Qb Rb and A^T = Qa Ra (thin QR), so B A = Qb (Rb Ra^T) Qa^T; the SVD of the small core
    Rb Ra^T = Uc S Vch gives U = Qb Uc and Vh = Vch Qa^T. Computed in float64.
    """
    Qb, Rb = torch.linalg.qr(B.double())  # (out, kb), (kb, R)
    Qa, Ra = torch.linalg.qr(A.double().T)  # (in, ka), (ka, R)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (kb, ka)
    return Qb @ Uc, S, Vch @ Qa.T


def frobenius(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F in float64, through whichever is smaller: the (out, in) product itself, or
    sqrt(trace((B^T B)(A A^T))) from two (R x R) Gram matrices.

    The Grams cost O((out + in) R^2) and R^2 memory, the product O(out in R) and out x in: a
    stack of many clients (R = the sum of their ranks) over a small layer takes the product, so
    memory stays within the larger of the layer and the Gram of one layer's rank, never
    quadratic in the number of clients. The Grams' round-off is about 1e-16 of ||B||^2 ||A||^2
    on the squared norm, a relative error near 1e-8 of the operands' scale at worst.
    """
    if B.shape[1] == 0:
        return 0.0
    B64, A64 = B.double(), A.double()
    if B.shape[0] * A.shape[1] <= B.shape[1] ** 2:
        return float(torch.linalg.matrix_norm(B64 @ A64))
    gram_B = B64.T @ B64  # (R, R)
    gram_A = A64 @ A64.T  # (R, R)
    squared = float((gram_B * gram_A).sum())  # trace(G_B G_A) with both symmetric
    return max(squared, 0.0) ** 0.5


def numerical_rank(S: torch.Tensor, rtol: float = 1e-7) -> int:
    """Singular values above ``rtol`` of the largest (at least 1, so a zero update keeps a
    zero component and a shape)."""
    if not S.numel() or S[0] <= 0:
        return 1
    return max(1, int((S[0] * rtol < S).sum()))


def exact_refactor(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> LoraFactors:
    """B @ A re-factored at its numerical rank through :func:`lowrank_svd` (scaling 1)."""
    U, S, Vh = lowrank_svd(B, A)
    return svd_truncate(U, S, Vh, numerical_rank(S), dtype)
