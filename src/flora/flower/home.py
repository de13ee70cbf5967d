"""Flower's state for ``--runtime flower-sim``: a FLWR_HOME of the run's own, telemetry off.

Flower keeps its state in ``$FLWR_HOME`` (default ``~/.flwr``) and writes a ``source`` id there
at its first telemetry event, even with telemetry off; it reads ``FLWR_TELEMETRY_ENABLED`` once,
when ``flwr`` is imported. So ``flora run`` enters :func:`own_flower_home` before the first flwr
import (this module imports none), and holds it for the whole simulation, Ray's workers included
(they inherit the environment). Values the user set in the environment are kept.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from flora.quiet import environment

__all__ = ["own_flower_home"]


@contextlib.contextmanager
def own_flower_home() -> Iterator[None]:
    """While the block runs: FLWR_HOME in a temporary directory (removed afterwards) unless one
    is set, and Flower's telemetry and update checks off."""
    values = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with contextlib.ExitStack() as stack:
        if not os.environ.get("FLWR_HOME"):
            home = stack.enter_context(tempfile.TemporaryDirectory(prefix="flora-flwr-home-"))
            values["FLWR_HOME"] = home
        stack.enter_context(environment(values))
        yield
