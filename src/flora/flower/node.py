"""Which node a message runs on and where that node keeps its state; imports no torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flora.paths import cache_root

__all__ = ["STATE_ENV", "Node", "default_state_dir", "run_directory"]

STATE_ENV = "FLORA_FLOWER_STATE"


def default_state_dir() -> Path:
    """``$FLORA_FLOWER_STATE``, else ``<flora cache>/flower-state``."""
    env = os.environ.get(STATE_ENV)
    return Path(env).expanduser() if env else cache_root() / "flower-state"


@dataclass(frozen=True)
class Node:
    """Where a message runs: the node's partition, its state dir, the run's key, and the
    device its node config names (empty: the run's ``train.device``).

    The key is the flora run's (the ServerApp's ``run-key``, kept across a resume, which
    starts a new Flower run), else the Flower run id.
    """

    partition: int
    state_dir: Path
    run: str
    device: str = ""  # node config ``device`` (e.g. "cuda:1"): overrides the run's train.device

    @property
    def directory(self) -> Path:
        return run_directory(self.state_dir, self.run) / f"partition-{self.partition}"

    def to_json(self) -> dict[str, str | int]:
        return {
            "partition": self.partition,
            "state_dir": str(self.state_dir),
            "run": self.run,
            "device": self.device,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Node:
        partition, state_dir = int(str(data["partition"])), Path(str(data["state_dir"]))
        return cls(partition, state_dir, str(data["run"]), str(data.get("device", "")))


def run_directory(state_dir: Path, run: str) -> Path:
    """Where a node keeps one run's state: ``<state dir>/run-<key>``."""
    if not run or not all(c.isalnum() or c in "-_" for c in run):
        raise ValueError(f"run key {run!r}: expected letters, digits, '-' or '_'")
    return state_dir / f"run-{run}"
