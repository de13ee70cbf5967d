"""The ClientApp: one flora client per node (``flora.flower.client_app:app``).

A node knows its partition from its node config (``partition-id``: the simulation runtime sets
it; a SuperNode takes ``--node-config 'partition-id=0 num-partitions=10'``). Train and evaluate
messages go to flora.flower.client; query messages (the ServerApp asking which partition a node
holds) are answered here without importing torch, since a SuperNode starts a fresh process for
every message.

With node config ``worker`` (the socket of ``flora flower-worker``, see flora.flower.worker) train
and evaluate messages run in that warm process instead, so this one never imports torch; when
no worker answers, the message runs here.

Where a node keeps its state: node config ``state-dir``, else run config ``state-dir``, else the
directory given to :func:`make_client_app`, else ``$FLORA_FLOWER_STATE``, else
``<flora cache>/flower-state``. Which device it trains on: node config ``device`` (``cpu``,
``cuda``, ``cuda:1``, ...), else the run's ``train.device``.
"""

from __future__ import annotations

import shutil
from logging import WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from flora.errors import FloraError
from flora.flower.node import Node, default_state_dir, run_directory

__all__ = ["app", "make_client_app"]


def _state_dir(context: Context, state_dir: Path | None) -> Path:
    for source in (context.node_config, context.run_config):
        if source.get("state-dir"):
            return Path(str(source["state-dir"])).expanduser()
    return state_dir or default_state_dir()


def _node(message: Message, context: Context, state_dir: Path | None) -> Node:
    if "partition-id" not in context.node_config:
        raise FloraError(
            "this node has no partition-id: start it with --node-config 'partition-id=K'"
        )
    partition = int(context.node_config["partition-id"])
    task = message.content.config_records.get("task")
    run = str(task.get("run-key", "")) if task is not None else ""
    device = str(context.node_config.get("device", "") or "")
    return Node(
        partition, _state_dir(context, state_dir), run or str(message.metadata.run_id), device
    )


def _forget(record: ConfigRecord, context: Context, state_dir: Path | None) -> RecordDict:
    """Delete this node's state of one run (the ServerApp asks after a successful run)."""
    key = str(record.get("run-key", ""))
    try:
        directory = run_directory(_state_dir(context, state_dir), key)
    except ValueError as error:
        raise FloraError(f"forget: {error}") from None
    shutil.rmtree(directory, ignore_errors=True)
    return RecordDict({"forgot": ConfigRecord({"run-key": key})})


def _run(kind: str, message: Message, context: Context, state_dir: Path | None) -> Message:
    """The message's work: on the node's worker when it has one, else in this process."""
    node = _node(message, context, state_dir)
    worker = str(context.node_config.get("worker", "") or "")
    if worker:
        from flora.flower.relay import WorkerUnavailable, call

        try:
            content = call(Path(worker).expanduser(), kind, message.content, node)
            return Message(content, reply_to=message)
        except WorkerUnavailable as error:
            log(WARNING, "flora: %s; running the %s message in the ClientApp", error, kind)
    from flora.flower import client

    return Message(client.WORK[kind](message.content, node), reply_to=message)


def make_client_app(state_dir: Path | None = None) -> ClientApp:
    """A ClientApp whose nodes keep their state under ``state_dir`` (default: see above)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return _run("train", message, context, state_dir)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return _run("evaluate", message, context, state_dir)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        if "forget" in message.content.config_records:
            forget = message.content.config_records["forget"]
            return Message(_forget(forget, context, state_dir), reply_to=message)
        keys = ("partition-id", "num-partitions")
        node = ConfigRecord({k: context.node_config[k] for k in keys if k in context.node_config})
        return Message(RecordDict({"node": node}), reply_to=message)

    return app


app = make_client_app()
