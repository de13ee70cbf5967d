"""The ServerApp: find the nodes, run flora's rounds through FloraStrategy, write the results.

Run config keys (``[tool.flwr.app.config]`` in flower-app/pyproject.toml, or
``flwr run ... --run-config "config='/abs/tiny.toml' run-dir='/abs/runs/x'"``):

- ``config``: the flora TOML (relative paths resolve against the SuperLink's working dir)
- ``set``: dotted overrides separated by ``;``, e.g. ``"federation.rounds=3;train.lr=1e-3"``
- ``run-dir``: where config.json, metrics.jsonl, checkpoints/ and final/ go
- ``state-dir``: the nodes' state (read by the ClientApp; a node's own node config wins)
- ``node-wait``: seconds to wait for every partition's node to connect (default 300)
- ``round-timeout``: seconds a round waits for replies before going on without them (3600)
- ``poll-interval``: seconds between the ServerApp's pulls for replies (0.2; Flower's own: 3)
- ``client-eval``: also measure the held-out loss on a client node (default false: the ServerApp
  evaluates its own copy of the global model, as the embedded runtime does)
- ``resume``: continue the run in ``run-dir`` after its last checkpoint (default false), with
  the run's own config.json (``config`` and ``set`` are then ignored). The nodes keep their
  state per flora run (``run-key`` in ``run-dir/flower.json``), so they go on from where they
  were; a node that lost it gets every merged update again.
- ``keep-node-state``: keep the nodes' state after the run (default false: a successful run
  asks every node to delete its ``run-<key>`` directory)

The run directory has the embedded runtime's layout, so the same tools read both.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
    UserConfig,
)
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flora.adapters import Adapter
from flora.checkpoint import load_checkpoint
from flora.config import RunConfig, config_to_dict, load_config
from flora.errors import FloraError
from flora.flower.grid import PollingGrid
from flora.flower.records import config_json, node_from_content
from flora.flower.state import run_data
from flora.flower.strategy import FloraStrategy
from flora.generation import generate_answer
from flora.io import atomic_write_json
from flora.metrics import read_metrics
from flora.models import load_model, resolve_precision
from flora.server import Server
from flora.simulation import (
    RunResult,
    _deltas,
    applied,
    load_run_config,
    save_final,
    target_shapes,
)
from flora.training import evaluate_loss, merge_into_base

__all__ = ["ServerModel", "app", "discover_partitions", "make_server_app", "run_server"]


def discover_partitions(grid: Grid, num_partitions: int, wait: float) -> dict[int, int]:
    """partition -> node id, asking each connected node which partition it holds."""
    deadline = time.monotonic() + wait
    while len(node_ids := list(grid.get_node_ids())) < num_partitions:
        if time.monotonic() > deadline:  # in simulation round 1 may see no node yet
            raise FloraError(
                f"{len(node_ids)} of {num_partitions} nodes connected after {wait:.0f} s; start "
                "one SuperNode per partition (--node-config 'partition-id=K num-partitions=N')"
            )
        time.sleep(1.0)
    queries = [Message(RecordDict(), node, MessageType.QUERY) for node in node_ids]
    nodes: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=wait):
        if reply.has_error():
            log(WARNING, "node %d did not answer: %s", reply.metadata.src_node_id,
                reply.error.reason)  # fmt: skip
            continue
        try:
            k, n = node_from_content(reply.content)
        except FloraError:  # a node started without --node-config partition-id
            log(WARNING, "node %d has no partition-id; ignored", reply.metadata.src_node_id)
            continue
        if n != num_partitions or k in nodes:
            raise FloraError(
                f"node {reply.metadata.src_node_id} holds partition {k} of {n}; the run needs "
                f"partitions 0..{num_partitions - 1}, one node each"
            )
        nodes[k] = reply.metadata.src_node_id
    missing = sorted(set(range(num_partitions)) - set(nodes))
    if missing:
        raise FloraError(f"no node holds partitions {missing}; set their partition-id")
    return nodes


def _settings(run_config: UserConfig) -> tuple[RunConfig, Path]:
    run_dir = str(run_config.get("run-dir", "")) or f"runs/flower-{time.strftime('%Y%m%d-%H%M%S')}"
    if bool(run_config.get("resume", False)):
        if not run_config.get("run-dir"):
            raise FloraError("run config resume=true needs the run's run-dir='/abs/runs/x'")
        return load_run_config(Path(run_dir)), Path(run_dir)
    path = str(run_config.get("config", ""))
    if not path:
        raise FloraError("run config 'config' is empty; pass --run-config 'config=\"PATH.toml\"'")
    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    return load_config(path, overrides), Path(run_dir)


class ServerModel:
    """The ServerApp's copy of the base: W0 plus every merged update, as the embedded runtime
    keeps it. It evaluates the global model on the held-out set and becomes final/model."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.precision = resolve_precision(config.train.precision)
        self.model, self.tokenizer = load_model(
            config.model.name, precision=self.precision, seed=config.seed
        )
        self.shapes = target_shapes(self.model, config.model.target_modules)
        self.data = run_data(config, self.tokenizer)
        self.merged = 0  # rounds of the server's history merged into the weights

    def sync(self, server: Server) -> None:
        for update in server.history[self.merged :]:  # W += B A (+ R), in order
            merge_into_base(self.model, _deltas(update))
        self.merged = len(server.history)

    def evaluate(self, lora: Adapter | None) -> tuple[float, list[dict[str, str]]]:
        """Held-out loss and sample answers of the base with ``lora`` merged (restored after)."""
        eval_config, pad_id = self.config.eval, int(self.tokenizer.pad_token_id)
        with applied(self.model, lora):
            loss = evaluate_loss(self.model, self.data.heldout, batch_size=eval_config.batch_size,
                                 pad_id=pad_id, precision=self.precision)  # fmt: skip
            samples = [
                {"instruction": r["instruction"], "answer": generate_answer(
                    self.model, self.tokenizer, r["instruction"], r.get("context", ""),
                    template=self.config.data.template,  # type: ignore[arg-type]
                    max_new_tokens=eval_config.max_new_tokens, precision=self.precision)}
                for r in self.data.heldout_records[: eval_config.samples]
            ]  # fmt: skip
        return loss, samples

    def mmlu(self, round: int, lora: Adapter | None) -> dict[str, Any]:
        """The ``mmlu`` metrics row of the base with ``lora`` merged (eval.mmlu)."""
        from flora.evaluation.during_run import mmlu_row

        with applied(self.model, lora):
            return mmlu_row(self.model, self.tokenizer, self.config.eval, round, self.precision)

    def save(self, final: Path, lora: Adapter | None) -> None:
        save_final(final, self.model, self.tokenizer, self.config, lora)


def _run_key(run_dir: Path, resume: bool) -> str:
    """The flora run's key for the nodes' state: new for a new run, kept across resumes."""
    path = run_dir / "flower.json"
    if resume:
        if not path.is_file():
            raise FloraError(
                f"{run_dir} holds no Flower run (no flower.json); resume it with the runtime "
                "that started it (flora run --resume for the embedded runtime)"
            )
        return str(json.loads(path.read_text(encoding="utf-8"))["run_key"])
    key = uuid.uuid4().hex[:16]
    atomic_write_json(path, {"run_key": key})
    return key


def forget_node_state(grid: Grid, nodes: dict[int, int], run_key: str, timeout: float) -> None:
    """Ask every node to delete its state of this run (best effort: a node that is gone keeps
    its directory, ``<state dir>/run-<key>``, and says nothing)."""
    content = RecordDict({"forget": ConfigRecord({"run-key": run_key})})
    messages = [Message(content, node, MessageType.QUERY) for node in nodes.values()]
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log(WARNING, "node %d kept its state: %s", reply.metadata.src_node_id,
                reply.error.reason)  # fmt: skip


def run_server(
    grid: Grid, config: RunConfig, run_dir: Path, options: UserConfig, *, resume: bool = False
) -> RunResult:
    """The whole run on ``grid``: nodes, evaluation before, rounds, evaluation after, outputs.
    With ``resume``, go on after ``run_dir``'s last checkpoint instead (``config`` must be the
    run's own)."""
    start = time.perf_counter()
    if resume:
        checkpoint = load_checkpoint(run_dir)
    elif (run_dir / "metrics.jsonl").exists():
        raise FloraError(
            f"{run_dir} already holds a run; give another run-dir, or resume=true to continue it"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    run_key = _run_key(run_dir, resume)
    if not resume:
        atomic_write_json(run_dir / "config.json", config_to_dict(config))
    base = ServerModel(config)
    log(INFO, "flora: clients' data\n%s", base.data.table)
    server = Server(config, base.shapes)
    nodes = discover_partitions(grid, server.num_clients, float(options.get("node-wait", 300)))
    log(INFO, "flora: partitions on nodes %s", nodes)
    client_eval = bool(options.get("client-eval", False))
    strategy = FloraStrategy(server, nodes, run_dir, config_json(config), client_eval, run_key)

    def evaluate(round: int) -> MetricRecord | None:
        base.sync(server)
        metrics = None
        if strategy.evaluates(round):
            loss, samples = base.evaluate(server.global_lora)
            strategy.record_evaluation(round, loss, samples)
            metrics = MetricRecord({"heldout-loss": loss})
        if config.eval.mmlu_at(round, config.federation.rounds):
            strategy.metrics.write(base.mmlu(round, server.global_lora))
        return metrics

    timeout = float(options.get("round-timeout", 3600))
    first = 1
    if resume:
        server.restore(checkpoint.state, checkpoint.history, checkpoint.global_lora)
        base.sync(server)
        strategy.metrics.truncate(checkpoint.round)
        strategy.evaluations = {
            int(r["round"]): r for r in read_metrics(run_dir / "metrics.jsonl")
            if r.get("kind") == "eval" and "client" not in r
        }  # fmt: skip
        first = checkpoint.round + 1
        log(INFO, "flora: resuming %s after round %d", run_dir, checkpoint.round)
    else:
        if client_eval:
            zero = strategy.configure_evaluate(0, ArrayRecord(), ConfigRecord(), grid)
            strategy.aggregate_evaluate(0, grid.send_and_receive(zero, timeout=timeout))
        evaluate(0)
    strategy.run_rounds(grid, first, timeout, evaluate)
    base.save(run_dir / "final", server.global_lora)
    result = _summary(strategy, run_dir, time.perf_counter() - start)
    if not bool(options.get("keep-node-state", False)):
        forget_node_state(grid, nodes, run_key, timeout)
    return result


def _summary(strategy: FloraStrategy, run_dir: Path, seconds: float) -> RunResult:
    evals = strategy.evaluations
    rounds = strategy.server.config.federation.rounds
    if 0 not in evals or rounds not in evals:
        raise FloraError(f"the held-out evaluation before or after failed; see {run_dir}")
    before, after = evals[0], evals[rounds]
    samples = [
        {"instruction": b["instruction"], "before": b["answer"], "after": a["answer"]}
        for b, a in zip(before["samples"], after["samples"], strict=False)
    ]
    result = RunResult(run_dir, before["heldout_loss"], after["heldout_loss"], samples, seconds)
    summary = dataclasses.asdict(result) | {"run_dir": str(run_dir), "runtime": "flower"}
    atomic_write_json(run_dir / "summary.json", summary)
    return result


def make_server_app(
    config: RunConfig | None = None, run_dir: Path | None = None, options: UserConfig | None = None
) -> ServerApp:
    """A ServerApp for ``config`` (None: read everything from the Flower run config, above)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = context.run_config | (options or {})
        grid = PollingGrid(grid, float(settings.get("poll-interval", 0.2)))
        if config is not None and run_dir is not None:
            run_server(grid, config, run_dir, settings, resume=bool(settings.get("resume")))
        else:
            run_server(grid, *_settings(settings), settings, resume=bool(settings.get("resume")))

    return app


app = make_server_app()
