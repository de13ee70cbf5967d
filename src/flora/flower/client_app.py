"""The ClientApp: one flora client per node, training with the same ``train_client`` as embedded.

A node knows its partition from its node config (``partition-id``; the simulation runtime sets it,
a SuperNode takes ``--node-config 'partition-id=0 num-partitions=10'``). Each train message
brings the task, the run config and the merged updates the client missed; the client restores
its base (flora.flower.state), applies them, trains a fresh LoRA of its rank (or continues the
global one), stores its new base, and replies with its factors. Evaluate messages measure the
held-out loss of the global model on the client's (caught-up) base.

Where a node keeps its state: node config ``state-dir``, else run config ``state-dir``, else
``$FLORA_FLOWER_STATE``, else ``<flora cache>/flower-state``.

Test hook: ``FLORA_FLOWER_FAULT=<partition>@<round>[:exit]`` makes that client fail mid-round,
by raising or by killing its own process.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

__all__ = ["FAULT_ENV", "client_app", "make_client_app"]

FAULT_ENV = "FLORA_FLOWER_FAULT"


def _state_dir(context: Context, bound: Path | None) -> Path:
    from flora.flower.state import default_state_dir

    for source in (context.node_config, context.run_config):
        if source.get("state-dir"):
            return Path(str(source["state-dir"])).expanduser()
    return bound if bound is not None else default_state_dir()


def _partition(context: Context, expected: int) -> int:
    from flora.errors import FloraError

    if "partition-id" not in context.node_config:
        raise FloraError("this node has no partition-id: start it with --node-config 'partition-id=K'")
    partition = int(context.node_config["partition-id"])
    if partition != expected:
        raise FloraError(f"task for partition {expected} reached the node of partition {partition}")
    return partition


def _maybe_fail(partition: int, round: int) -> None:
    """The test hook: fail here when ``FLORA_FLOWER_FAULT`` names this partition and round."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    where, _, mode = spec.partition(":")
    if where != f"{partition}@{round}":
        return
    if mode == "exit":
        os._exit(17)  # a crash: no reply, no cleanup
    raise RuntimeError(f"injected fault ({FAULT_ENV}={spec})")


def _sync(message: Message, context: Context, bound: Path | None):  # type: ignore[no-untyped-def]
    """Read the task, put the partition's base at the server's state; (info, base, dir)."""
    from flora.flower.records import task_from_record, updates_from_record
    from flora.flower.state import load_base
    from flora.simulation import _deltas
    from flora.training import merge_into_base

    info = task_from_record(message.content.config_records["task"])
    partition = _partition(context, info.task.client)
    root = _state_dir(context, bound)
    directory = root / f"run-{message.metadata.run_id}" / f"partition-{partition}"
    base = load_base(info.config)
    base.restore(directory, info.since)
    catch_up = updates_from_record(
        message.content.array_records["catch-up"], info.catch_up_rounds
    )
    for update in catch_up:  # W += B A (+ R), in order: as the embedded runtime merges
        merge_into_base(base.model, _deltas(update))
    return info, base, directory, root


def train(message: Message, context: Context, bound: Path | None = None) -> Message:
    """One local round: sync the base, train, store the base, reply with the factors."""
    from flora.flower.records import adapter_from_record, adapter_to_record
    from flora.flower.state import load_data
    from flora.models import resolve_precision
    from flora.training import train_client

    info, base, directory, root = _sync(message, context, bound)
    task, config = info.task, info.config
    init = None
    if "init" in message.content.array_records:
        init = adapter_from_record(dict(message.content.array_records["init"].to_torch_state_dict()))
    data = load_data(config, task.client, base.tokenizer, root)
    _maybe_fail(task.client, task.round)
    precision = resolve_precision(config.train.precision)
    result = train_client(
        base.model,
        data.examples,
        rank=task.rank,
        alpha=task.alpha,
        target_modules=config.model.target_modules,
        config=dataclasses.replace(config.train, precision=precision),
        seed=task.seed,
        pad_id=int(base.tokenizer.pad_token_id),
        init=init,
        freeze_A=task.freeze_A,
        use_rslora=config.lora.use_rslora,
    )
    if info.through != info.since:
        base.save(directory, info.through, keep_from=info.since)
    scaling = next(iter(result.factors.values())).scaling
    metrics = MetricRecord(
        {
            "partition": task.client,
            "num-examples": result.examples,
            "tokens": result.tokens,
            "steps": result.steps,
            "train-loss": result.train_loss,
            "seconds": result.seconds,
            "scaling": scaling,
        }
    )
    factors = ArrayRecord(adapter_to_record(result.factors))
    return Message(RecordDict({"factors": factors, "metrics": metrics}), reply_to=message)


def evaluate(message: Message, context: Context, bound: Path | None = None) -> Message:
    """Held-out loss (and sample answers) of the global model on this client's synced base."""
    from flora.flower.records import adapter_from_record
    from flora.flower.state import load_data
    from flora.generation import generate_answer
    from flora.models import resolve_precision
    from flora.simulation import applied
    from flora.training import evaluate_loss

    info, base, directory, root = _sync(message, context, bound)
    config = info.config
    lora = None
    if "lora" in message.content.array_records:
        lora = adapter_from_record(dict(message.content.array_records["lora"].to_torch_state_dict()))
    data = load_data(config, info.task.client, base.tokenizer, root)
    precision = resolve_precision(config.train.precision)
    answers = []
    with applied(base.model, lora):
        loss = evaluate_loss(
            base.model,
            data.heldout,
            batch_size=config.eval.batch_size,
            pad_id=int(base.tokenizer.pad_token_id),
            precision=precision,
        )
        for record in data.heldout_records[: config.eval.samples]:
            answers.append(
                generate_answer(
                    base.model,
                    base.tokenizer,
                    record["instruction"],
                    record.get("context", ""),
                    template=config.data.template,  # type: ignore[arg-type]
                    max_new_tokens=config.eval.max_new_tokens,
                    precision=precision,
                )
            )
    if info.through != info.since:
        base.save(directory, info.through, keep_from=info.since)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"partition": info.task.client, "heldout-loss": loss, "num-examples": len(data.heldout)}
            ),
            "samples": ConfigRecord(
                {
                    "instructions": "\x1f".join(r["instruction"] for r in data.heldout_records[: len(answers)]),
                    "answers": "\x1f".join(answers),
                }
            ),
        }
    )
    return Message(content, reply_to=message)


def query(message: Message, context: Context) -> Message:
    """Which partition this node holds (the ServerApp maps partitions to node ids with it)."""
    node = {k: context.node_config[k] for k in ("partition-id", "num-partitions") if k in context.node_config}
    return Message(RecordDict({"node": ConfigRecord(node)}), reply_to=message)


def make_client_app(state_dir: Path | None = None) -> ClientApp:
    """A ClientApp whose nodes keep their state under ``state_dir`` (default: see above)."""
    app = ClientApp()

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        return train(message, context, state_dir)

    @app.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        return evaluate(message, context, state_dir)

    @app.query()
    def _query(message: Message, context: Context) -> Message:
        return query(message, context)

    return app


client_app = make_client_app()
