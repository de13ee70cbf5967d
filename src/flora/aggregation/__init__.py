"""Aggregation methods for federated LoRA: pure maths over adapters, in a registry by name.

``aggregate(name, clients, weights, **options)`` checks the inputs, normalises the weights and
runs the method; ``measure(...)`` reports the aggregation noise and bytes of any result.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flora.adapters import Adapter
from flora.aggregation import fedex_lora, fedit, ffa_lora, flexlora, flora, florist, zero_padding
from flora.aggregation.base import AggregationResult
from flora.aggregation.report import AggregationReport, measure
from flora.aggregation.validate import check_clients, normalize_weights
from flora.errors import FloraError

__all__ = [
    "METHODS",
    "AggregationReport",
    "AggregationResult",
    "Method",
    "aggregate",
    "get_method",
    "measure",
]


@dataclass(frozen=True)
class Method:
    """A registered aggregation method and the facts the engine and the docs need."""

    name: str
    run: Callable[..., AggregationResult]
    exact: bool  # realised update == sum_k p_k s_k B_k A_k
    mixed_ranks: bool  # accepts clients of different ranks
    keeps_global_lora: bool  # clients continue from the global LoRA (else it is merged into W)
    paper: str

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword options the method accepts beyond (clients, weights)."""
        params = inspect.signature(self.run).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("flora", flora.aggregate, True, True, False, "Wang et al., NeurIPS 2024"),
        Method("fedit", fedit.aggregate, False, False, True, "Zhang et al., ICASSP 2024"),
        Method("zero-padding", zero_padding.aggregate, False, True, True, "Cho et al., EMNLP 2024"),
        Method("flexlora", flexlora.aggregate, False, True, True, "Bai et al., NeurIPS 2024"),
        Method("ffa-lora", ffa_lora.aggregate, True, False, True, "Sun et al., ICLR 2024"),
        Method("fedex-lora", fedex_lora.aggregate, True, False, False, "Singhal et al., 2025"),
        Method("florist", florist.aggregate, False, True, False, "Ramesh and Dass, 2025"),
    )
}


def get_method(name: str) -> Method:
    """The registered method ``name``, or a FloraError listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise FloraError(
            f"method '{name}' is unknown; choose one of: {', '.join(METHODS)}"
        ) from None


def aggregate(
    method: str,
    clients: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    **options: object,
) -> AggregationResult:
    """Validate, normalise weights (None: equal), and aggregate ``clients`` with ``method``."""
    spec = get_method(method)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise FloraError(f"{method}: unknown option '{unknown[0]}' (valid options: {valid})")
    check_clients(clients)
    return spec.run(list(clients), normalize_weights(weights, len(clients)), **options)
