"""A node's warm worker (flora.flower.worker) and the ClientApp's relay to it (flora.flower.relay).

The worker serves from a thread of this process on a real Unix socket; the ClientApp reaches it
through node config ``worker``, as on a SuperNode started by scripts/flower-deploy.sh.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import load_file
from tests.flower.inline_grid import InlineGrid
from tests.flower.test_apps import FAST, TINY, assert_same_rounds, rows

from flora import simulation
from flora.config import load_config
from flora.errors import FloraError
from flora.flower.client_app import make_client_app
from flora.flower.node import Node
from flora.flower.relay import WorkerUnavailable, call, decode_content, encode_content
from flora.flower.server_app import run_server
from flora.flower.worker import serve

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: a Unix socket path must fit in 108 bytes."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="flw") as tmp:
        yield Path(tmp)


@pytest.fixture
def worker(short_tmp) -> Iterator[Path]:
    """A worker serving on ``<short_tmp>/w.sock`` from a thread; stopped and checked after."""
    path, stop = short_tmp / "w.sock", threading.Event()
    thread = threading.Thread(target=serve, args=(path,), kwargs={"stop": stop})
    thread.start()
    for _ in range(1200):  # the first start imports torch and friends
        if path.exists():
            break
        thread.join(0.05)
    assert path.exists(), "the worker did not start listening"
    yield path
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and not path.exists()  # stopped and removed its socket


def test_content_survives_the_wire_bitwise():
    tensors = {"m/A": torch.randn(3, 5), "m/B": torch.randn(7, 3).double()}
    content = RecordDict({"factors": ArrayRecord(tensors), "task": ConfigRecord({"x": [1, 2]})})
    back = decode_content(encode_content(content))
    got = back.array_records["factors"].to_torch_state_dict()
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())
    assert back.config_records["task"]["x"] == [1, 2]


def test_rounds_through_the_worker_equal_the_embedded_runtime(tmp_path, worker, capfd):
    # Prepare: 2 of 3 clients a round, so the worker also replays a missed update
    config = load_config(TINY, [*FAST, "federation.fraction=0.6", "federation.rounds=2"])
    grid = InlineGrid(make_client_app(tmp_path / "nodes"), 3, extra={"worker": str(worker)})
    # Execute
    run_server(grid, config, tmp_path / "flower", {"client-eval": True})
    simulation.run(config, tmp_path / "embedded", quiet=True)
    # Assert: bitwise the embedded run, and every message went through the worker
    assert_same_rounds(tmp_path / "flower", tmp_path / "embedded", 2)
    final = [
        load_file(d / "final/model/model.safetensors")
        for d in (tmp_path / "flower", tmp_path / "embedded")
    ]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])
    log = capfd.readouterr().err
    kinds = [m.metadata.message_type for m in grid.sent if m.metadata.message_type != "query"]
    assert log.count("train for partition") == kinds.count("train") == 4
    assert log.count("evaluate for partition") == kinds.count("evaluate") > 0


def test_a_failure_on_the_worker_fails_only_that_client(tmp_path, worker, fail_client):
    fail_client(1, 1)
    config = load_config(TINY, [*FAST, "federation.rounds=2"])
    grid = InlineGrid(make_client_app(tmp_path / "nodes"), 3, extra={"worker": str(worker)})
    run_server(grid, config, tmp_path / "flower", {})
    servers = rows(tmp_path / "flower", "server")
    assert [(r["clients"], r["failed"]) for r in servers] == [([0, 2], [1]), ([0, 1, 2], [])]
    errors = [m.error.reason for m in grid.replies if m.has_error()]
    assert len(errors) == 1 and "on the node's worker: injected fault" in errors[0]


def test_without_a_listening_worker_the_message_runs_in_the_client_app(tmp_path, short_tmp):
    config = load_config(
        TINY, [*FAST, "federation.rounds=1", "federation.num_clients=2", "lora.ranks=[4, 2]"]
    )
    grid = InlineGrid(
        make_client_app(tmp_path / "nodes"), 2, extra={"worker": str(short_tmp / "gone.sock")}
    )
    run_server(grid, config, tmp_path / "flower", {})
    assert [r["failed"] for r in rows(tmp_path / "flower", "server")] == [[]]


def test_relay_errors_are_clear(short_tmp):
    with pytest.raises(WorkerUnavailable, match="no flora worker listens"):
        call(short_tmp / "none.sock", "train", RecordDict(), Node(0, short_tmp, "1"))
    with pytest.raises(FloraError, match="kind"):
        call(short_tmp / "none.sock", "fit", RecordDict(), Node(0, short_tmp, "1"))
    # a peer that accepts and then hangs up mid-message (a worker that crashed)
    path = short_tmp / "crash.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(8)
        conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    with pytest.raises(FloraError, match="stopped during the message"):
        call(path, "train", RecordDict(), Node(0, short_tmp, "1"))
    thread.join(5)
    server.close()


def test_a_second_worker_on_a_live_socket_is_refused_and_bad_work_is_answered(worker):
    done = subprocess.run(
        [sys.executable, "-m", "flora.cli", "flower-worker", "--socket", str(worker)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "already listens" in done.stderr
    with pytest.raises(FloraError, match="on the node's worker: .*task"):  # and it goes on
        call(worker, "train", RecordDict(), Node(0, worker.parent, "1"))
    with pytest.raises(FloraError, match="on the node's worker"):
        call(worker, "evaluate", RecordDict(), Node(0, worker.parent, "1"))
