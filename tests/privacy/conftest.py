"""The privacy tests that run Flower (the in-process grid, flower-sim) drop the nodes' cached
models afterwards, as tests/flower/ does (a cached model would show in the engine's one-model
memory test), and keep Flower's files in a temporary FLWR_HOME."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True)
def _node_caches_and_flwr_home(tmp_path_factory, monkeypatch) -> Iterator[None]:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
    yield
    try:
        from flora.node_state import clear_caches
    except ImportError:  # flwr not installed: those tests skip themselves
        return
    clear_caches()
