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
  the run's own config.json (``config`` and ``set`` are then ignored). The nodes keep their
  state per flora run (``run-key`` in ``run-dir/flower.json``), so they go on from where they
  were; a node that lost it gets every merged update again.
- ``keep-node-state``: keep the nodes' state after the run (default false: a successful run
  asks every node to delete its ``run-<key>`` directory)

The run directory has the embedded runtime's layout (flora.outputs), so the same tools read
both; the rows, evaluation and checkpoints come from the same core (flora.engine.RunCore).
"""

from __future__ import annotations

import json
import time
import uuid
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict, UserConfig
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flora.config import RunConfig, load_config, load_run_config
from flora.engine import RunCore
from flora.errors import FloraError
from flora.flower.grid import PollingGrid
from flora.flower.records import config_json, node_from_content
from flora.flower.runtime import FlowerRuntime
from flora.io import atomic_write_json
from flora.outputs import RunResult, finished
from flora.packaged import config_path

__all__ = ["app", "discover_partitions", "make_server_app", "run_server"]


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
            log(
                WARNING,
                "node %d did not answer: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
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
