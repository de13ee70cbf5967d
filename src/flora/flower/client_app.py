"""The ClientApp: one flora client per node (``flora.flower.client_app:app``).

A node knows its partition from its node config (``partition-id``: the simulation runtime sets
it; a SuperNode takes ``--node-config 'partition-id=0 num-partitions=10'``). Train and evaluate
messages go to flora.flower.client; query messages (the ServerApp asking which partition a node
holds) are answered here without importing torch, since a SuperNode starts a fresh process for
every message.

Where a node keeps its state: node config ``state-dir``, else run config ``state-dir``, else the
directory given to :func:`make_client_app`, else ``$FLORA_FLOWER_STATE``, else
``<flora cache>/flower-state``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flora.errors import FloraError

if TYPE_CHECKING:
    from flora.flower.client import Node

__all__ = ["app", "make_client_app"]


def _node(message: Message, context: Context, state_dir: Path | None) -> Node:
    from flora.flower.client import Node
    from flora.flower.state import default_state_dir

    if "partition-id" not in context.node_config:
        raise FloraError(
            "this node has no partition-id: start it with --node-config 'partition-id=K'"
        )
    for source in (context.node_config, context.run_config):
        if source.get("state-dir"):
            state_dir = Path(str(source["state-dir"])).expanduser()
    partition = int(context.node_config["partition-id"])
    return Node(partition, state_dir or default_state_dir(), message.metadata.run_id)


def make_client_app(state_dir: Path | None = None) -> ClientApp:
    """A ClientApp whose nodes keep their state under ``state_dir`` (default: see above)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        from flora.flower import client

        content = client.train(message.content, _node(message, context, state_dir))
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        from flora.flower import client

        content = client.evaluate(message.content, _node(message, context, state_dir))
        return Message(content, reply_to=message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        keys = ("partition-id", "num-partitions")
        node = ConfigRecord({k: context.node_config[k] for k in keys if k in context.node_config})
        return Message(RecordDict({"node": node}), reply_to=message)

    return app


app = make_client_app()
