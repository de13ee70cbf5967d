"""The aggregation report: noise of the realised update against the exact one, and bytes.

Noise is the relative Frobenius error ||realised - exact||_F / ||exact||_F, where
exact = sum_k p_k s_k B_k A_k. For low-rank results both sides are factored, so the error comes
from thin QRs of stacked factors without forming (out, in) matrices; a dense residual (fedex-lora)
is compared densely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from flora.aggregation.base import AggregationResult
from flora.aggregation.lowrank import frobenius, stacked
from flora.factors import Adapter, LoraFactors

__all__ = ["AggregationReport", "measure"]


@dataclass
class AggregationReport:
    """Noise per module and overall, per-client noise of redistributed downloads, and bytes."""

    method: str
    weights: list[float]
    client_ranks: list[dict[str, int]]
    global_ranks: dict[str, int]
    noise: float
    noise_per_module: dict[str, float]
    bytes_up: list[int]
    bytes_down: list[int]
    client_noise: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite numbers become None."""
        data = asdict(self)
        data["noise"] = _finite(self.noise)
        data["noise_per_module"] = {k: _finite(v) for k, v in self.noise_per_module.items()}
        if self.client_noise is not None:
            data["client_noise"] = [_finite(v) for v in self.client_noise]
        data["bytes_up_total"] = sum(self.bytes_up)
        data["bytes_down_total"] = sum(self.bytes_down)
        return data


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _error(exact: LoraFactors, realised: LoraFactors, residual: torch.Tensor | None) -> float:
    """||realised (+ residual) - exact||_F."""
    if residual is not None:
        diff = realised.delta().double() + residual.double() - exact.delta().double()
        return float(torch.linalg.matrix_norm(diff))
    # [B_e, -s B_r] @ [A_e; A_r] = exact - realised: (out, R_e + r) @ (R_e + r, in)
    B = torch.cat([exact.B, -realised.scaling * realised.B], dim=1)
    A = torch.cat([exact.A, realised.A], dim=0)
    return frobenius(B, A)


def _relative(errors: Sequence[float], norms: Sequence[float]) -> float:
    err = math.sqrt(sum(e * e for e in errors))
    norm = math.sqrt(sum(n * n for n in norms))
    if norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / norm


def measure(
    clients: Sequence[Adapter], weights: Sequence[float], result: AggregationResult
) -> AggregationReport:
    """Compare ``result`` with the exact weighted sum of ``clients`` (weights normalised; the
    clients' whole updates where the result has them)."""
    clients = result.reference or clients
    noise_per_module: dict[str, float] = {}
    errors: list[float] = []
    norms: list[float] = []
    client_errors: list[list[float]] = [[] for _ in clients]
    for module in clients[0]:
        exact = stacked([c[module] for c in clients], weights)
        norm = frobenius(exact.B, exact.A)
        residual = None if result.residual is None else result.residual[module]
        error = _error(exact, result.global_factors[module], residual)
        noise_per_module[module] = _relative([error], [norm])
        errors.append(error)
        norms.append(norm)
        if result.client_factors is not None:
            for k, download in enumerate(result.client_factors):
                client_errors[k].append(_error(exact, download[module], None))
    client_noise = None
    if result.client_factors is not None:
        client_noise = [_relative(errs, norms) for errs in client_errors]
    return AggregationReport(
        method=result.method,
        weights=list(weights),
        client_ranks=[{m: f.rank for m, f in c.items()} for c in clients],
        global_ranks={m: f.rank for m, f in result.global_factors.items()},
        noise=_relative(errors, norms),
        noise_per_module=noise_per_module,
        bytes_up=list(result.bytes_up),
        bytes_down=list(result.bytes_down),
        client_noise=client_noise,
    )
