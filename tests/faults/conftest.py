"""The ``tamper`` fixture: a hostile or broken client for one round (tests/faults/tamper.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from tests.faults.tamper import Change


@pytest.fixture
def tamper() -> Iterator[Callable[[int, int, Change], None]]:
    from tests.faults.tamper import tamper as arm_one

    undo: list[Callable[[], None]] = []

    def arm(partition: int, round: int, change: Change) -> None:
        undo.append(arm_one(partition, round, change))

    yield arm
    for step in reversed(undo):
        step()


@pytest.fixture(autouse=True)
def _one_thread(torch_single_thread: None) -> None:
    """Tiny models on a busy 2-core machine: one thread is much faster."""
