"""The extension seams, proven from the tests alone (nothing under src/ knows these names):
a method with its own client side, a runtime, and a metric sink defined here run end to end."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.seams import alternate

from flora import simulation
from flora.aggregation import METHODS
from flora.aggregation.lifecycle import initial_lora
from flora.aggregation.registry import register
from flora.client import ClientResult, client_round
from flora.config import load_config
from flora.engine import RunCore, Runtime, drive
from flora.errors import FloraError
from flora.factors import LoraFactors, adapter_from_tensors
from flora.metrics import read_metrics
from flora.node_state import NodeBase, clear_caches, load_base
from flora.protocol import ClientTask
from flora.runtimes import RUNTIMES, RuntimeEntry
from flora.runtimes import register as register_runtime

TINY = "configs/tiny.toml"
FAST = [
    "train.max_steps=2",
    "train.batch_size=2",
    "eval.samples=0",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=48",
    "lora.ranks=[2, 2, 2]",
]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def alternating() -> Iterator[str]:
    """The test's own method, registered for the test and removed after."""
    register(alternate.METHOD)
    yield alternate.METHOD.name
    del METHODS[alternate.METHOD.name]


def rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def lora_at(run_dir: Path, round: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"round_{round:04d}" / "global_lora.safetensors")


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model" / "model.safetensors")


def assert_bitwise(ours: Path, theirs: Path, rounds: int) -> None:
    for t in range(1, rounds + 1):
        a, b = lora_at(ours, t), lora_at(theirs, t)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), t
    a, b = final_model(ours), final_model(theirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for kind, key in (("eval", "heldout_loss"), ("client", "train_loss")):
        assert [r[key] for r in rows(ours, kind)] == [r[key] for r in rows(theirs, kind)]


# --- a method with its own client side ---------------------------------------------------------


def test_alternating_factors_average_exactly_on_tiny_tensors():
    # Prepare: three clients that share A (an odd round), then three that share B (an even one)
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    weights = [0.5, 0.3, 0.2]
    odd = [{"m": LoraFactors(A, torch.randn(5, 3, generator=g), 2.0)} for _ in weights]
    even = [{"m": LoraFactors(torch.randn(3, 7, generator=g), B, 2.0)} for _ in weights]
    for clients in (odd, even):
        # Execute
        result = alternate.aggregate(clients, weights)
        # Assert: the realised update is sum_k p_k s_k B_k A_k
        exact = sum(p * c["m"].delta() for p, c in zip(weights, clients, strict=True))
        torch.testing.assert_close(result.global_factors["m"].delta(), exact, rtol=1e-6, atol=1e-6)


def test_a_method_defined_in_a_test_trains_its_own_parts_on_both_runtimes(tmp_path, alternating):
    pytest.importorskip("flwr", reason="the Flower half needs `pip install -e '.[flower]'`")
    from tests.flower.test_apps import run_flower

    # Prepare
    config = load_config(TINY, [*FAST, f"federation.method='{alternating}'", "federation.rounds=2"])
    # Execute
    simulation.run(config, tmp_path / "embedded", quiet=True)
    flower = run_flower(config, tmp_path)
    # Assert: bitwise equal runtimes, exact rounds, and each round trained its own factor
    assert_bitwise(flower, tmp_path / "embedded", 2)
    embedded = tmp_path / "embedded"
    assert all(r["noise"] < 1e-5 for r in rows(embedded, "server"))
    one, two = (
        adapter_from_tensors(lora_at(embedded, 1)),
        adapter_from_tensors(lora_at(embedded, 2)),
    )
    shapes = {m: (f.out_features, f.in_features) for m, f in one.items()}
    start = initial_lora(shapes, 2, config.seed)
    for m in one:  # round 1 trained B over the initial A, round 2 A under round 1's B
        assert torch.equal(one[m].A, start[m].A) and torch.count_nonzero(one[m].B) > 0
        assert not torch.equal(two[m].A, one[m].A) and torch.equal(two[m].B, one[m].B)
    ups = {r["round"]: r["bytes_up"] for r in rows(embedded, "client")}
    assert ups[1] > 0 and ups[2] > 0 and ups[1] != ups[2]  # B (out x r) up, then A (r x in)


# --- a runtime ---------------------------------------------------------------------------------


class Threads(Runtime):
    """Clients on a worker thread, each on its own copy of the base (restored from its stored
    snapshot and caught up, as a Flower node does), not on the server's model. One worker:
    torch's RNG is one per process, so two clients seeding it at once would race."""

    name = "threads"

    def __init__(self, core: RunCore, quiet: bool) -> None:
        self.core = core
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.nodes = core.outputs.run_dir / "nodes"

    def _client(self, task: ClientTask) -> ClientResult:
        base = NodeBase(load_base(self.core.config), self.nodes / f"partition-{task.client}")
        data = self.core.model.client_data(task.client)
        result = client_round(base, data, task, self.core.config)
        if result.error is None:
            base.store(task)
        return result

    def execute(self, round: int, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        return list(self.pool.map(self._client, tasks))

    def close(self) -> None:
        self.pool.shutdown()
        clear_caches()


def run_threads(config, run_dir, *, resume=False, quiet=False):  # type: ignore[no-untyped-def]
    return drive(config, run_dir, Threads, resume=resume, quiet=quiet)


@pytest.fixture
def threads() -> Iterator[str]:
    register_runtime(
        RuntimeEntry(
            name="threads",
            driver=f"{__name__}:run_threads",
            help="clients on a thread pool (a test's runtime)",
        )
    )
    yield "threads"
    del RUNTIMES["threads"]


@pytest.mark.parametrize("method", ["flora", "fedit"])
def test_a_runtime_defined_in_a_test_gives_the_embedded_run_bitwise(tmp_path, threads, method):
    from flora.cli import main

    # Prepare: 2 of 3 clients a round, so some client catches up on a round it missed
    overrides = [
        *FAST,
        f"federation.method='{method}'",
        "federation.rounds=2",
        "federation.fraction=0.6",
    ]
    config = load_config(TINY, overrides)
    # Execute: through `flora run --runtime threads`, then the embedded runtime
    sets = [arg for o in overrides for arg in ("--set", o)]
    assert (
        main(
            [
                "run",
                TINY,
                *sets,
                "--out",
                str(tmp_path / "threads"),
                "--runtime",
                threads,
                "--quiet",
            ]
        )
        == 0
    )
    simulation.run(config, tmp_path / "embedded", quiet=True)
    # Assert
    ours, theirs = final_model(tmp_path / "threads"), final_model(tmp_path / "embedded")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for kind, key in (("eval", "heldout_loss"), ("client", "train_loss"), ("client", "bytes_down")):
        threads_rows, embedded_rows = (
            rows(tmp_path / "threads", kind),
            rows(tmp_path / "embedded", kind),
        )
        assert [r[key] for r in threads_rows] == [r[key] for r in embedded_rows]
    if method == "flora":
        assert max(r["catch_up_rounds"] for r in rows(tmp_path / "threads", "client")) == 1


def test_runtimes_are_named_in_one_table():
    from flora.runtimes import driver

    assert list(RUNTIMES)[:2] == ["embedded", "flower-sim"]
    assert driver("embedded") is simulation.run
    with pytest.raises(FloraError, match="runtime 'nope' is unknown; choose one of: embedded"):
        driver("nope")
    register_runtime(
        RuntimeEntry(
            name="absent",
            driver="flora_absent_module:run",
            help="-",
            install="pip install flora-absent",
        )
    )
    try:
        with pytest.raises(FloraError, match="cannot start .*; run `pip install flora-absent`"):
            driver("absent")
    finally:
        del RUNTIMES["absent"]


def test_a_run_resumes_only_on_the_runtime_that_marks_it(tmp_path, capsys):
    from flora.cli import main

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "flower.json").write_text("{}")
    assert main(["run", "--resume", str(tmp_path)]) != 0
    assert "ran on flower-sim; resume it with --runtime flower-sim" in capsys.readouterr().err
