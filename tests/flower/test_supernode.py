"""flora's shorter waits on Flower's side: `flora flower-supernode` (idle poll, array retries)
and the ServerApp grid's array retries. They reach into Flower 1.41's modules by name, so these
tests fail when Flower stops waiting the way they patch (the deployment tests in
test_runtimes.py run them end to end)."""

from __future__ import annotations

import functools
import inspect
import sys
import time

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

import flwr.supernode.start_client_internal as loop
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid import http_grid

from flora.cli import main
from flora.flower import supernode
from flora.flower.grid import PollingGrid
from flora.flower.supernode import RETRY_CAP, RETRY_FIRST, CappedSleep


def test_flowers_supernode_loop_waits_the_way_flora_shortens():
    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    assert loop.time is time
    assert loop.pull_objects is inflatable_utils.pull_objects
    assert http_grid.pull_objects is inflatable_utils.pull_objects
    defaults = inspect.signature(inflatable_utils.pull_objects).parameters
    assert defaults["initial_backoff"].default == 1  # what RETRY_FIRST replaces


def test_capped_sleep_caps_only_sleep(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    capped = CappedSleep(0.2)
    capped.sleep(3)
    capped.sleep(0.05)
    assert slept == [0.2, 0.05]
    assert capped.monotonic is time.monotonic and capped.time is time.time


def test_flora_flower_supernode_runs_flowers_supernode_with_its_waits_shortened(monkeypatch):
    # Prepare: Flower's entry point replaced by one that records what it would run with
    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(loop, "pull_objects", inflatable_utils.pull_objects)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    seen = {}

    def flower_supernode() -> None:
        seen.update(argv=list(sys.argv), time=loop.time, pull=loop.pull_objects)

    monkeypatch.setattr("flwr.supernode.cli.flower_supernode", flower_supernode)
    # Execute
    code = main(["flower-supernode", "--idle-poll", "0.1", "--", "--insecure", "--port", "9"])
    # Assert: every flag after -- passed unchanged; the waits capped; the retries quick
    assert code == 0
    assert seen["argv"] == ["flower-supernode", "--insecure", "--port", "9"]
    assert isinstance(seen["time"], CappedSleep) and seen["time"].cap == 0.1
    pull = seen["pull"]
    assert isinstance(pull, functools.partial) and pull.func is inflatable_utils.pull_objects
    assert pull.keywords == {"initial_backoff": RETRY_FIRST, "backoff_cap": RETRY_CAP}


def test_an_idle_poll_out_of_range_is_one_line(capsys):
    assert main(["flower-supernode", "--idle-poll", "5", "--", "--insecure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--idle-poll must be within 0.01..3 seconds" in err[0]


def test_the_servers_grid_retries_a_missing_array_quickly(monkeypatch):
    monkeypatch.setattr(http_grid, "pull_objects", inflatable_utils.pull_objects)
    PollingGrid(object.__new__(http_grid.HttpGrid), 0.2)
    quick = http_grid.pull_objects
    assert isinstance(quick, functools.partial)
    assert quick.keywords == {"initial_backoff": RETRY_FIRST, "backoff_cap": RETRY_CAP}
    PollingGrid(object.__new__(http_grid.HttpGrid), 0.2)  # a second wrap keeps one partial
    assert http_grid.pull_objects is quick
    assert supernode.RETRY_FIRST < 1
