"""Hand a message's work to the node's warm worker (flora.flower.worker) over a Unix socket.

A SuperNode starts a fresh ClientApp process for every message, and importing torch,
transformers and peft there costs seconds each time. With a worker (node config ``worker`` =
its socket path) the ClientApp stays light: it sends the message content to the worker, which
keeps the libraries, the model and the data partition in memory, and relays the reply back.

Wire format, both ways: frames of an 8-byte big-endian length and the bytes. A request is a
JSON header (``kind``: train or evaluate; the Node's ``partition``, ``state_dir``, ``run``) and
the RecordDict as Flower's own protobuf; a reply is a JSON header (``ok``, ``error``) and, when ok,
the reply's RecordDict. No pickle: a worker only ever parses JSON and protobuf.

This module imports no torch.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from flora.errors import FloraError
from flora.flower.node import Node

__all__ = [
    "KINDS",
    "WorkerUnavailable",
    "call",
    "decode_content",
    "encode_content",
    "read_frame",
    "write_frame",
]

KINDS = ("train", "evaluate")
_LENGTH = struct.Struct(">Q")
MAX_FRAME = 1 << 36  # 64 GiB: a corrupt length fails here, not in a huge allocation


class WorkerUnavailable(FloraError):
    """No worker listens on the socket (none started, or it exited): run the message here."""


def write_frame(sock: socket.socket, payload: bytes) -> None:
    # A peer that has the whole frame may answer and hang up at once: an empty payload sent
    # after its length would then meet a closed socket (a broken pipe). Small frames go in one
    # send; a large payload is still unread when the length arrives, so it needs no copy.
    if len(payload) < 1 << 20:
        sock.sendall(_LENGTH.pack(len(payload)) + payload)
    else:
        sock.sendall(_LENGTH.pack(len(payload)))
        sock.sendall(payload)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 22))
        if not chunk:
            raise ConnectionError(f"connection closed with {left} of {size} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> bytes:
    (size,) = _LENGTH.unpack(_read_exactly(sock, _LENGTH.size))
    if size > MAX_FRAME:
        raise ConnectionError(f"frame of {size} bytes announced; not a flora worker peer")
    return _read_exactly(sock, size)


def encode_content(content: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(content).SerializeToString())


def decode_content(payload: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(payload)
    return recorddict_from_proto(proto)


def call(path: Path, kind: str, content: RecordDict, node: Node) -> RecordDict:
    """Run one train/evaluate message on the worker at ``path``; its reply content.

    Raises WorkerUnavailable when nothing accepts the connection (the caller may then run the
    message itself) and FloraError with the worker's own message when the work failed there.
    """
    if kind not in KINDS:
        raise FloraError(f"worker message kind {kind!r}: expected one of {', '.join(KINDS)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as error:
            raise WorkerUnavailable(f"no flora worker listens on {path} ({error})") from None
        header = {"kind": kind, **node.to_json()}
        try:
            write_frame(sock, json.dumps(header).encode())
            write_frame(sock, encode_content(content))
            reply: dict[str, Any] = json.loads(read_frame(sock))
            payload = read_frame(sock) if reply.get("ok") else b""
        except ConnectionError as error:  # BrokenPipe, reset, or closed mid-frame
            raise FloraError(
                f"the node's worker at {path} stopped during the message ({error}); see its log"
            ) from None
        if not reply.get("ok"):
            raise FloraError(f"on the node's worker: {reply.get('error', 'unknown error')}")
        return decode_content(payload)
    finally:
        sock.close()
