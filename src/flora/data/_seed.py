"""Seeded random generators: one per call, never the global RNG."""

from __future__ import annotations

import numpy as np

from flora.errors import FloraError

__all__ = ["make_rng"]


def make_rng(*seed: int) -> np.random.Generator:
    """``numpy.random.default_rng`` over one or more non-negative integers (e.g. seed, epoch)."""
    for part in seed:
        if isinstance(part, bool) or not isinstance(part, int | np.integer) or part < 0:
            raise FloraError(f"seed must be a non-negative integer, got {part!r}")
    return np.random.default_rng([int(part) for part in seed])
