"""A node's warm worker: ``flora flower-worker --socket PATH``, next to a SuperNode, or
``flora flower-worker --supernode HOST:PORT``, its executor (flora.flower.executor).

It imports torch, transformers and peft once, then serves the node's train and evaluate
messages (flora.flower.relay) one at a time with the same functions a ClientApp would call
(flora.flower.client), keeping the model and the data partition in memory between them. A
node's base still goes to its state dir after every successful round, so a worker that dies
loses nothing: the next ClientApp finds no worker and runs the message itself.

Start it before the SuperNode and give the node ``--node-config "... worker='PATH'"``;
scripts/flower-deploy.sh does both. The socket is created owner-only (mode 0600). SIGTERM or
SIGINT stops it after the message in progress and removes the socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flora.errors import FloraError
from flora.flower.node import Node
from flora.flower.relay import KINDS, decode_content, encode_content, read_frame, write_frame

__all__ = ["serve", "serve_node"]

_IO_TIMEOUT = 300.0  # seconds for one socket read or write (not for the work itself)


def _log(text: str) -> None:
    print(f"[flora worker {os.getpid()}] {text}", file=sys.stderr, flush=True)


def _bind(path: Path) -> socket.socket:
    """Listen on ``path``; a stale socket file (no one accepting) is replaced, a live one not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        else:
            raise FloraError(f"a worker already listens on {path}; give another --socket")
        finally:
            probe.close()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    except OSError as error:
        server.close()
        raise FloraError(f"cannot listen on {path}: {error}; give a writable --socket") from None
    finally:
        os.umask(old)
    server.listen(4)
    return server


def _handle(conn: socket.socket) -> str:
    """One request on ``conn``: run it, send the reply. Returns a line for the log."""
    from flora.flower import client

    header: dict[str, Any] = json.loads(read_frame(conn))
    content = decode_content(read_frame(conn))
    kind = header.get("kind")
    start = time.perf_counter()
    try:
        if kind not in KINDS:
            raise FloraError(f"unknown message kind {kind!r}")
        reply = client.WORK[kind](content, Node.from_json(header))
    except Exception as error:  # the node's error reply carries it; the worker keeps serving
        write_frame(conn, json.dumps({"ok": False, "error": f"{error}"}).encode())
        return f"{kind} failed after {time.perf_counter() - start:.1f} s: {error}"
    write_frame(conn, json.dumps({"ok": True}).encode())
    write_frame(conn, encode_content(reply))
    return f"{kind} for partition {header['partition']} in {time.perf_counter() - start:.1f} s"


def serve(path: Path, *, max_messages: int = 0, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT, ``stop`` is set, or ``max_messages`` (> 0) were served.

    Returns 0. Run from another thread (tests), it installs no signal handlers.
    """
    from flora.flower import client  # the heavy imports, once, before serving

    stop = stop or threading.Event()
    server = _bind(path)
    server.settimeout(0.5)  # how often a quiet worker looks at ``stop``
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread
        handler = lambda signum, frame: stop.set()  # noqa: E731
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _log(f"ready on {path}, {client.process_age():.1f} s after the process started")
    served = 0
    try:
        while not stop.is_set() and (max_messages <= 0 or served < max_messages):
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(_IO_TIMEOUT)  # a peer that stalls mid-frame cannot hang the node
                try:
                    _log(_handle(conn))
                except (ConnectionError, OSError, ValueError) as error:
                    _log(f"dropped a connection: {error}")
            served += 1
    finally:
        server.close()
        path.unlink(missing_ok=True)
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)
        _log(f"stopped after {served} messages")
    return 0


def serve_node(address: str, *, stop: threading.Event | None = None, max_tasks: int = 0) -> int:
    """Be the executor of the SuperNode at ``address`` (started with ``--isolation process``):
    run its ClientApp tasks in this process until SIGTERM/SIGINT or ``stop``. Returns 0."""
    from flora.flower import client
    from flora.flower.client_app import make_client_app
    from flora.flower.executor import serve_tasks

    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        handler = lambda signum, frame: stop.set()  # noqa: E731
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _log(f"executor of {address}, {client.process_age():.1f} s after the process started")
    ran = 0
    try:
        ran = serve_tasks(address, make_client_app(), stop, log=_log, max_tasks=max_tasks)
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)
        _log(f"stopped after {ran} tasks")
    return 0
