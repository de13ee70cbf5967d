"""The ServerApp: find the nodes, run flora's rounds on them (FlowerRuntime), write the results.

Run config keys (``[tool.flwr.app.config]`` in flower-app/pyproject.toml, or
``flwr run ... --run-config "config='/abs/tiny.toml' run-dir='/abs/runs/x'"``):

- ``config``: the flora TOML (relative paths resolve against the SuperLink's working dir), or
  a shipped config's name (default ``tiny``; ``flora configs list``)
- ``set``: dotted overrides separated by ``;``, e.g. ``"federation.rounds=3;train.lr=1e-3"``
- ``run-dir``: where config.json, metrics.jsonl, checkpoints/ and final/ go
- ``state-dir``: the nodes' state (read by the ClientApp; a node's own node config wins)
- ``node-wait``: seconds to wait for every partition's node to connect (default 300)
- ``round-timeout``: seconds a round waits for replies before going on without them (3600)
- ``poll-interval``: seconds between the ServerApp's pulls for replies (0.2; Flower's own: 3)
- ``client-eval``: also measure the held-out loss on a client node (default false: the ServerApp
  evaluates its own copy of the global model, as the embedded runtime does)
- ``server-device``: where the ServerApp holds its copy of the model ("cpu", "cuda", ...;
  default the run's ``train.device``; the nodes' own node config ``device`` sets theirs)
- ``resume``: continue the run in ``run-dir`` after its last checkpoint (default false), with
  the run's own config.json (``config`` and ``set`` are then ignored); ``rounds`` (default 0:
  the run's own) extends it to that many rounds, as ``flora run --resume --rounds N``. The
  nodes keep their state per flora run (``run-key`` in ``run-dir/flower.json``), so they go on
  from where they were; a node that lost it gets every merged update again.
- ``keep-node-state``: keep the nodes' state after the run (default false: a successful run
  asks every node to delete its ``run-<key>`` directory)

A federation whose nodes do not match the config's clients (``flwr run`` on a simulation
federation of another ``num-supernodes``, a SuperNode started with another ``num-partitions``)
is refused as soon as the first node answers, in one line that gives the fix. A FloraError
(flora's own refusal of bad input) reaches Flower's log as that one line, not a traceback.

The run directory has the embedded runtime's layout (flora.outputs), so the same tools read
both; the rows, evaluation and checkpoints come from the same core (flora.engine.RunCore).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict, UserConfig
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flora.config import RunConfig, extend_rounds, load_config, load_run_config
from flora.engine import RunCore
from flora.errors import FloraError
from flora.flower.grid import PollingGrid
from flora.flower.records import config_json, node_from_content
from flora.flower.runtime import FlowerRuntime
from flora.io import atomic_write_json
from flora.outputs import RunResult, finished
from flora.packaged import config_path

__all__ = ["app", "discover_partitions", "make_server_app", "run_server"]


def _mismatch(node: int, k: int, n: int, num_partitions: int) -> FloraError:
    return FloraError(
        f"node {node} holds partition {k} of {n}, but the config has {num_partitions} clients: "
        f"on a simulation federation run `flwr run` with --federation-config "
        f"'num-supernodes={num_partitions}' (`flora run --runtime flower-sim` sizes it itself); "
        f"in a deployment start {num_partitions} SuperNodes with --node-config "
        f"'partition-id=K num-partitions={num_partitions}'"
    )


def _ask(grid: Grid, node_ids: list[int], wait: float) -> dict[int, tuple[int, int] | None]:
    """node -> (partition-id, num-partitions) for each node that answered (None: no partition)."""
    queries = [Message(RecordDict(), node, MessageType.QUERY) for node in node_ids]
    answers: dict[int, tuple[int, int] | None] = {}
    for reply in grid.send_and_receive(queries, timeout=wait):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %d did not answer: %s", node, reply.error.reason)
            continue
        try:
            answers[node] = node_from_content(reply.content)
        except FloraError:  # a node started without --node-config partition-id
            log(WARNING, "node %d has no partition-id; ignored", node)
            answers[node] = None
    return answers


def discover_partitions(grid: Grid, num_partitions: int, wait: float) -> dict[int, int]:
    """partition -> node id, asking each node which partition it holds as soon as it connects;
    a node that holds a partition of another count is refused at once, in one line."""
    deadline = time.monotonic() + wait
    known: dict[int, tuple[int, int] | None] = {}
    nodes: dict[int, int] = {}
    while True:
        new = [node for node in grid.get_node_ids() if node not in known]
        left = max(deadline - time.monotonic(), 1.0)
        for node, answer in _ask(grid, new, left).items() if new else ():
            known[node] = answer
            if answer is None:
                continue
            k, n = answer
            if n != num_partitions:
                raise _mismatch(node, k, n, num_partitions)
            if k in nodes or not 0 <= k < num_partitions:
                raise FloraError(
                    f"node {node} holds partition {k} of {n}; the run needs partitions "
                    f"0..{num_partitions - 1}, one node each"
                )
            nodes[k] = node
        if len(nodes) == num_partitions:
            return nodes
        if time.monotonic() > deadline:
            missing = sorted(set(range(num_partitions)) - set(nodes))
            raise FloraError(
                f"{len(nodes)} of {num_partitions} partitions have a node after {wait:.0f} s "
                f"(none holds {missing}); start one SuperNode per partition (--node-config "
                f"'partition-id=K num-partitions={num_partitions}')"
            )
        time.sleep(1.0)


def _settings(run_config: UserConfig) -> tuple[RunConfig, Path]:
    run_dir = str(run_config.get("run-dir", "")) or f"runs/flower-{time.strftime('%Y%m%d-%H%M%S')}"
    if bool(run_config.get("resume", False)):
        if not run_config.get("run-dir"):
            raise FloraError("run config resume=true needs the run's run-dir='/abs/runs/x'")
        config = load_run_config(Path(run_dir))
        rounds = int(run_config.get("rounds", 0) or 0)
        return (extend_rounds(config, rounds) if rounds else config), Path(run_dir)
    path = str(run_config.get("config", ""))
    if not path:
        raise FloraError("run config 'config' is empty; pass --run-config 'config=\"PATH.toml\"'")
    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    return load_config(config_path(path), overrides), Path(run_dir)


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
            log(
                WARNING,
                "node %d kept its state: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )


def run_server(
    grid: Grid, config: RunConfig, run_dir: Path, options: UserConfig, *, resume: bool = False
) -> RunResult:
    """The whole run on ``grid``: nodes, evaluation before, rounds, outputs. With ``resume``,
    go on after ``run_dir``'s last checkpoint instead (``config`` must be the run's own)."""
    start = time.perf_counter()
    hint = "give another run-dir, or resume=true to continue it"
    if resume and (run_dir / "metrics.jsonl").exists():
        _run_key(run_dir, resume)  # refuses a run of the embedded runtime, with the fix
    if resume and finished(run_dir, config.federation.rounds):
        raise FloraError(
            f"{run_dir} finished all {config.federation.rounds} rounds; nothing changed (raise "
            "federation.rounds in its config.json to extend it)"
        )
    device = str(options.get("server-device", "") or "") or None
    core = RunCore(config, run_dir, resume=resume, hint=hint, device=device)
    try:
        return _run(grid, core, run_dir, options, resume, start)
    finally:
        core.close()


def _run(
    grid: Grid, core: RunCore, run_dir: Path, options: UserConfig, resume: bool, start: float
) -> RunResult:
    run_key = _run_key(run_dir, resume)
    log(INFO, "flora: clients' data\n%s", core.model.data.table)
    nodes = discover_partitions(grid, core.server.num_clients, float(options.get("node-wait", 300)))
    log(INFO, "flora: partitions on nodes %s", nodes)
    runtime = FlowerRuntime(
        core,
        grid,
        nodes,
        config_json(core.config),
        timeout=float(options.get("round-timeout", 3600)),
        client_eval=bool(options.get("client-eval", False)),
        run_key=run_key,
    )
    runtime.summary()
    if core.resumed:
        log(INFO, "flora: resuming %s after round %d", run_dir, core.first_round - 1)
    core.play(runtime)
    result = core.finish(time.perf_counter() - start, runtime.name)
    if not bool(options.get("keep-node-state", False)):
        forget_node_state(grid, nodes, run_key, runtime.timeout)
    return result


class _OneLine(logging.Filter):
    """Flower logs a ServerApp's exception with its traceback; flora's own refusals (FloraError:
    bad input, each message naming the fix) become that one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, FloraError):
            record.msg, record.args, record.exc_info = "flora: %s", (str(error),), None
        return True


if not any(isinstance(f, _OneLine) for f in logging.getLogger("flwr").filters):
    logging.getLogger("flwr").addFilter(_OneLine())


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
