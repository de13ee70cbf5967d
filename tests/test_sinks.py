"""Metric sinks (flora.sinks) on the tiny run, all offline: a sink defined here gets every row
of metrics.jsonl; TensorBoard's event files, a W&B offline run and an MLflow store hold the same
numbers and each client's local loss curve; a bad ``output.report_to`` is one line."""

from __future__ import annotations

import glob
import json
import math
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

import flora.simulation as simulation
from flora.cli import main
from flora.config import load_config
from flora.metrics import read_metrics
from flora.sinks import SINKS, Tracker, local_losses, scalars

TINY = "configs/tiny.toml"
FAST = [
    "federation.rounds=2",
    "train.max_steps=2",
    "train.batch_size=2",
    "eval.samples=1",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=48",
    "lora.ranks=[2, 2, 2]",
    "threads=1",
]
TRACKERS = ("tensorboard", "wandb", "mlflow")

OFFLINE = {
    "WANDB_MODE": "offline",  # W&B writes its .wandb file and sends nothing
    "WANDB_SILENT": "true",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_ERROR_REPORTING": "false",
    "WANDB_PROJECT": "flora-tests",
}


def _offline(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


class Recorder:
    """A sink defined in a test: keeps what it is given."""

    opened: ClassVar[list[Recorder]] = []

    def __init__(self, run_dir: Path, settings: dict[str, Any], kept: list[dict]) -> None:
        self.run_dir, self.settings, self.kept = run_dir, settings, kept
        self.rows: list[dict[str, Any]] = []
        self.closed = 0
        Recorder.opened.append(self)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(json.loads(json.dumps(row)))  # as metrics.jsonl holds it

    def close(self) -> None:
        self.closed += 1


class Broken:
    def __init__(self, *args: Any) -> None:
        pass

    def write(self, row: dict[str, Any]) -> None:
        raise ConnectionError("tracker unreachable")

    def close(self) -> None:
        pass


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Recorder]]:
    monkeypatch.setitem(SINKS, "recorder", Tracker(Recorder))
    monkeypatch.setitem(SINKS, "broken", Tracker(Broken))
    Recorder.opened = []
    yield Recorder


def test_a_sink_from_a_test_gets_every_row_and_a_broken_one_stops_nothing(
    recorder, tmp_path, capsys
):
    # Prepare
    config = load_config(TINY, [*FAST, "output.report_to=['broken', 'recorder']"])
    run_dir = tmp_path / "run"
    # Execute
    simulation.run(config, run_dir, quiet=True)
    # Assert
    (sink,) = recorder.opened
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert sink.rows == rows and sink.kept == [] and sink.closed == 1
    assert sink.run_dir == run_dir
    assert sink.settings["output"]["report_to"] == ["broken", "recorder"]
    assert {r["kind"] for r in rows} >= {"data", "client", "server", "eval"}
    clients = [r for r in rows if r["kind"] == "client"]
    assert all(len(r["loss_curve"]) == r["steps"] == 2 for r in clients)
    assert all(math.isclose(sum(r["loss_curve"]) / 2, r["train_loss"]) for r in clients)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "'broken'" in warnings[0] and "tracker unreachable" in warnings[0]


def test_a_resumed_run_hands_its_sinks_the_rows_it_kept(recorder, tmp_path):
    run_dir = tmp_path / "run"
    one = [*FAST, "federation.rounds=1", "output.report_to=['recorder']"]
    simulation.run(load_config(TINY, one), run_dir, quiet=True)
    first = read_metrics(run_dir / "metrics.jsonl")
    two = [*one, "federation.rounds=2"]
    simulation.run(load_config(TINY, two), run_dir, resume=True, quiet=True)  # extended
    _, resumed = recorder.opened
    assert [r["kind"] for r in resumed.kept] == [r["kind"] for r in first]  # "final" unmarked
    assert resumed.kept + resumed.rows == read_metrics(run_dir / "metrics.jsonl")
    assert {r["round"] for r in resumed.rows} == {2}


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("['nope']", ["output.report_to", "['nope']", "mlflow", "tensorboard", "wandb"]),
        ("['wandb', 'wandb']", ["output.report_to", "distinct"]),
        ("['missing']", ["output.report_to", "pip install 'flora-lora[missing-extra]'"]),
    ],
)
@pytest.mark.parametrize("dry", [False, True])
def test_a_bad_report_to_is_one_line_naming_the_field_and_the_fix(
    monkeypatch, tmp_path, capsys, value, words, dry
):
    not_installed = Tracker(Recorder, module="flora_no_such_package", extra="missing-extra")
    monkeypatch.setitem(SINKS, "missing", not_installed)
    run_dir = tmp_path / "run"
    argv = ["run", TINY, "--out", str(run_dir), "--quiet", "--set", f"output.report_to={value}"]
    argv += ["--dry-run"] if dry else []
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert all(word in err for word in words), err
    assert not (run_dir / "config.json").exists()  # refused before anything was written


def test_local_loss_curves_travel_through_flower_as_in_the_embedded_runtime(recorder, tmp_path):
    # Prepare
    pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")
    from tests.flower.inline_grid import InlineGrid

    from flora.flower.client_app import make_client_app
    from flora.flower.server_app import run_server

    config = load_config(TINY, [*FAST, "output.report_to=['recorder']"])
    # Execute
    simulation.run(config, tmp_path / "embedded", quiet=True)
    grid = InlineGrid(make_client_app(tmp_path / "nodes"), config.federation.num_clients)
    run_server(grid, config, tmp_path / "flower", {})
    # Assert: each client's curve, bitwise, in metrics.jsonl and in the sink of both runtimes
    embedded, flower = recorder.opened
    curves = [
        [(r["client"], r["round"], r["loss_curve"]) for r in sink.rows if r["kind"] == "client"]
        for sink in (embedded, flower)
    ]
    assert curves[0] == curves[1] and len(curves[0]) == 6
    assert all(len(curve) == 2 for _, _, curve in curves[0])
    assert flower.rows == read_metrics(tmp_path / "flower" / "metrics.jsonl")


def test_the_config_and_help_import_no_tracker():
    probe = (
        "import sys\nfrom flora.cli import main\nimport flora.config\n"
        "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(TRACKERS)!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"


# --- the trackers, on one tiny run --------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """A tiny run reported to every installed tracker, offline."""
    installed = [name for name in TRACKERS if _installed(name)]
    if not installed:
        pytest.skip("no tracker installed: pip install -e '.[tensorboard,wandb,mlflow]'")
    home = tmp_path_factory.mktemp("home")
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch, home)
        config = load_config(TINY, [*FAST, f"output.report_to={installed}"])
        simulation.run(config, run_dir, quiet=True)
    return run_dir


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _expected(run_dir: Path) -> dict[tuple[str, int], float]:
    """(name, step) -> value, for every number of metrics.jsonl's rows (flora.sinks' names)."""
    expected: dict[tuple[str, int], float] = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        for name, value in scalars(row).items():
            expected[(name, row["round"])] = value
        for name, step, loss in local_losses(row):
            expected[(name, step)] = loss
    return expected


def _check(found: dict[tuple[str, int], float], run_dir: Path, rel: float = 0.0) -> None:
    expected = _expected(run_dir)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=rel, abs=1e-300), key
    rows = read_metrics(run_dir / "metrics.jsonl")
    for row in (r for r in rows if r["kind"] == "client"):  # the local curves, point by point
        k, t, curve = row["client"], row["round"], row["loss_curve"]
        points = [found[(f"client/{k}/local_loss", (t - 1) * len(curve) + i)] for i in range(2)]
        assert points == pytest.approx(curve, rel=rel)
        assert found[(f"client/{k}/train_loss", t)] == pytest.approx(row["train_loss"], rel=rel)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [found[("eval/heldout_loss", r["round"])] for r in evals] == pytest.approx(
        [r["heldout_loss"] for r in evals], rel=rel
    )


Found = dict[tuple[str, int], float]  # (name, step) -> value


def _once(points: Iterator[tuple[str, int, float]]) -> Found:
    """The points as a dict; a (name, step) logged twice fails the test."""
    found: Found = {}
    for name, step, value in points:
        assert (name, step) not in found, f"{name} at step {step} logged twice"
        found[(name, step)] = value
    return found


def _tensorboard(run_dir: Path) -> Found:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    return _once((tag, e.step, e.value) for tag in tags for e in events.Scalars(tag))


def _mlflow(run_dir: Path) -> Found:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow" / "run-id").read_text().strip())
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["federation.method"] == "flora"
    history = client.get_metric_history
    return _once(
        (name, m.step, m.value) for name in run.data.metrics for m in history(run.info.run_id, name)
    )


def _wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB's log format
    (32 KiB blocks of chunks, each a 7-byte header: crc32, length, type 1 full / 2 first /
    3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # zero padding up to the block's end
            position += block - position % block
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_points(path: Path) -> Iterator[tuple[str, int, float]]:
    """Each logged number of one .wandb file at its x-axis value (``define_metric``)."""
    steps: dict[str, str] = {}  # metric -> its x-axis
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "metric" and record.metric.step_metric:
            steps[record.metric.name] = record.metric.step_metric
        elif kind == "history":
            item = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            yield from ((k, int(item[steps[k]]), v) for k, v in item.items() if k in steps)
    assert steps["client/0/local_loss"] == "client/0/local_step"
    assert steps["server/global_rank"] == "round"


def _wandb(run_dir: Path) -> Found:
    """Every offline part of the run (one per process: a resume adds one), in order."""
    run_id = (run_dir / "wandb" / "flora-run-id").read_text().strip()
    parts = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert parts
    return _once(point for part in parts for point in _wandb_points(Path(part)))


def test_tensorboard_event_files_hold_the_rows_and_local_curves(tracked):
    pytest.importorskip("tensorboard")
    _check(_tensorboard(tracked), tracked, rel=1e-6)  # TensorBoard keeps 32-bit floats


def test_an_mlflow_store_holds_the_rows_and_local_curves(tracked):
    pytest.importorskip("mlflow")
    _check(_mlflow(tracked), tracked)


def test_a_wandb_offline_run_holds_the_rows_and_local_curves(tracked):
    pytest.importorskip("wandb")
    _check(_wandb(tracked), tracked)


def test_a_resumed_run_goes_on_in_the_same_tracker_runs(tmp_path, monkeypatch):
    # Prepare: a 1-round run, then the same run extended to 2 rounds
    installed = [name for name in TRACKERS if _installed(name)]
    if not installed:
        pytest.skip("no tracker installed: pip install -e '.[tensorboard,wandb,mlflow]'")
    _offline(monkeypatch, tmp_path / "home")
    one = [*FAST, "federation.rounds=1", f"output.report_to={installed}"]
    run_dir = tmp_path / "tiny"
    simulation.run(load_config(TINY, one), run_dir, quiet=True)
    ids = {p.parent.name: p.read_text() for p in run_dir.glob("*/*run-id")}
    # Execute
    two = load_config(TINY, [*one, "federation.rounds=2"])
    simulation.run(two, run_dir, resume=True, quiet=True)
    # Assert: the same tracker runs, each holding metrics.jsonl's rows once
    assert {p.parent.name: p.read_text() for p in run_dir.glob("*/*run-id")} == ids
    readers = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}
    for name in installed:
        _check(readers[name](run_dir), run_dir, rel=1e-6 if name == "tensorboard" else 0.0)
    if "wandb" in installed:
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # `wandb sync` joins them
