"""The server's protocol: configure computes, complete commits."""

from __future__ import annotations

import pytest
import torch

from flora.client import ClientResult
from flora.config import load_config
from flora.errors import FloraError
from flora.factors import LoraFactors
from flora.server import Server

SHAPES = {"m": (6, 5)}


def _result(client: int, round: int, rank: int) -> ClientResult:
    factors = {"m": LoraFactors(torch.randn(rank, 5), torch.randn(6, rank), 2.0)}
    return ClientResult(client, round, factors=factors, examples=10)


def test_configure_changes_nothing_and_complete_advances_only_the_finished():
    # Prepare: 3 clients, all sampled; round 1 aggregated
    config = load_config("configs/tiny.toml", ["lora.ranks=[2, 2, 2]"])
    server = Server(config, SHAPES)
    tasks = server.configure(1)
    server.complete(tasks, done=[0, 1, 2])
    server.aggregate(1, tasks, [_result(t.client, 1, 2) for t in tasks])
    # Execute: round 2 configured twice (a retry), only client 1 finishes
    first, again = server.configure(2), server.configure(2)
    assert [len(t.catch_up) for t in first] == [len(t.catch_up) for t in again] == [1, 1, 1]
    assert server.synced == [0, 0, 0]
    server.complete(first, done=[1], lost=[2])
    # Assert: client 1 holds round 1's update; 0 still needs it; 2 starts from W0
    assert server.synced == [0, 1, 0]
    assert [(t.since, t.through) for t in server.configure(3)] == [(0, 1), (1, 1), (0, 1)]


def test_failed_uploads_are_left_out_of_the_aggregation():
    config = load_config("configs/tiny.toml", ["lora.ranks=[2, 2, 2]"])
    server = Server(config, SHAPES)
    tasks = server.configure(1)
    results = [_result(0, 1, 2), ClientResult(1, 1, error="boom"), _result(2, 1, 2)]
    outcome = server.aggregate(1, tasks, results)
    assert outcome is not None and outcome.update is not None
    assert outcome.report.weights == [0.5, 0.5]
    assert outcome.update.factors["m"].rank == 4  # two rank-2 clients stacked
    failed = [ClientResult(t.client, 2, error="x") for t in tasks]
    assert server.aggregate(2, tasks, failed) is None  # nothing usable: the round failed
    assert server.shortfall == "0 usable upload(s) of 3 sampled; federation.min_clients = 1"
    with pytest.raises(FloraError, match="1 results for 3 tasks; give one per task"):
        server.aggregate(2, tasks, failed[:1])
