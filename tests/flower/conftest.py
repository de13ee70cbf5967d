"""Flower's side effects stay in the test's temporary directory, and the ClientApps that ran in
this process drop their cached model and data afterwards, so later tests (e.g. the engine's
one-model memory test) see no extra tensors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

# no telemetry events (flwr reads this when imported, so before the test modules import it)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True, scope="session")
def _flwr_home(tmp_path_factory) -> Iterator[None]:
    """FLWR_HOME in a temporary directory: Flower writes ~/.flwr/source even without telemetry
    (the deployment script gives its processes their own)."""
    saved = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(tmp_path_factory.mktemp("flwr-home"))
    yield
    if saved is None:
        os.environ.pop("FLWR_HOME", None)
    else:
        os.environ["FLWR_HOME"] = saved


@pytest.fixture
def fail_client() -> Iterator[Callable[[int, int], None]]:
    """``fail_client(partition, round)``: that client's round fails (tests/flower/faults.py)."""
    undo: list[Callable[[], None]] = []

    def arm(partition: int, round: int) -> None:
        from tests.flower.faults import fail_client_round

        undo.append(fail_client_round(partition, round))

    yield arm
    for step in reversed(undo):
        step()


@pytest.fixture(autouse=True)
def _clear_node_caches() -> Iterator[None]:
    yield
    try:
        from flora.node_state import clear_caches
    except ImportError:  # flwr not installed: the modules skip themselves
        return
    clear_caches()
