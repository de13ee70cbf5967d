"""Which node a message runs on and where that node keeps its state; imports no torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flora.paths import cache_root

__all__ = ["STATE_ENV", "Node", "default_state_dir"]

STATE_ENV = "FLORA_FLOWER_STATE"


def default_state_dir() -> Path:
    """``$FLORA_FLOWER_STATE``, else ``<flora cache>/flower-state``."""
    env = os.environ.get(STATE_ENV)
    return Path(env).expanduser() if env else cache_root() / "flower-state"


@dataclass(frozen=True)
class Node:
    """Where a message runs: the node's partition, its state dir, the Flower run."""

    partition: int
    state_dir: Path
    run_id: int

    @property
    def directory(self) -> Path:
        return self.state_dir / f"run-{self.run_id}" / f"partition-{self.partition}"
