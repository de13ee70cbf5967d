"""Aggregation methods for federated LoRA: pure maths over adapters, in a registry by name.

``aggregate(name, clients, weights, **options)`` checks the inputs, normalises the weights once
and runs the method (the result carries the weights); ``measure(...)`` reports the aggregation
noise and bytes of any result. The registry (``METHODS``) imports no torch; the maths loads on
first use, so the config and the CLI's help stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flora.aggregation.registry import METHODS, Method, Option, get_method

if TYPE_CHECKING:
    from flora.aggregation.api import aggregate
    from flora.aggregation.base import AggregationResult
    from flora.aggregation.report import AggregationReport, measure

__all__ = [
    "METHODS",
    "AggregationReport",
    "AggregationResult",
    "Method",
    "Option",
    "aggregate",
    "get_method",
    "measure",
]

_LAZY = {
    "aggregate": "flora.aggregation.api",
    "AggregationResult": "flora.aggregation.base",
    "AggregationReport": "flora.aggregation.report",
    "measure": "flora.aggregation.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flora.aggregation' has no attribute {name!r}")
