"""``aggregate``: validate the inputs, normalise the weights once, run a registered method."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from flora.aggregation.base import AggregationResult
from flora.aggregation.registry import get_method
from flora.aggregation.validate import check_clients, normalize_weights
from flora.factors import Adapter

__all__ = ["aggregate"]


def aggregate(
    method: str,
    clients: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    **options: object,
) -> AggregationResult:
    """Validate, normalise weights (None: equal), and aggregate ``clients`` with ``method``.

    Options are checked against the method's registry entry (unknown names and bad values are
    refused before any maths); the result's ``weights`` are the normalised p_k it used.
    """
    spec = get_method(method)
    resolved = spec.resolve(options)
    check_clients(clients, values=not spec.checks_values)
    p = normalize_weights(weights, len(clients))
    result = spec.run(list(clients), p, **resolved)
    return dataclasses.replace(result, weights=p)
