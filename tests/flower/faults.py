"""Faults injected from the outside: flora's src/ holds no test hooks.

``fail_client_round(partition, round)`` makes flora's client round fail for that partition in
that round, as a crash after the node loaded its state and before it trained would: the result
carries the error, the node stores nothing, and the server leaves the client out. Run as a
script, it wraps the node's warm worker (scripts/flower-deploy.sh -w) with the same fault.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flora.client
from flora.client import ClientResult

MESSAGE = "injected fault"


def fail_client_round(partition: int, round: int) -> Callable[[], None]:
    """Patch ``flora.client.client_round``; returns the function that undoes it."""
    real = flora.client.client_round

    def failing(base: Any, data: Any, task: Any, config: Any, **kwargs: Any) -> ClientResult:
        if kwargs.get("train", True) and (task.client, task.round) == (partition, round):
            return ClientResult(
                task.client, task.round, error=f"{MESSAGE} (tests/flower/faults.py)"
            )
        return real(base, data, task, config, **kwargs)

    flora.client.client_round = failing  # type: ignore[assignment]
    return lambda: setattr(flora.client, "client_round", real)


if __name__ == "__main__":  # faults.py PARTITION@ROUND --socket PATH | --supernode HOST:PORT
    where, mode, target = sys.argv[1], sys.argv[2], sys.argv[3]
    partition, round = (int(v) for v in where.split("@"))
    fail_client_round(partition, round)
    from flora.flower.worker import serve, serve_node

    sys.exit(serve(Path(target)) if mode == "--socket" else serve_node(target))
