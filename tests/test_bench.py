"""bench/run_all.py (make bench) and bench/aggregation.py's paired timing, on fake benchmarks and
tiny tensors: what runs alone and in lanes, what a failure leaves, and the table's order."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


FAKE = """import argparse, json, sys, time
from pathlib import Path
p = argparse.ArgumentParser(); p.add_argument("--value", type=float); p.add_argument("--fail",
    action="store_true"); p.add_argument("--json", type=Path); a = p.parse_args()
Path(a.json.parent / (Path(sys.argv[0]).stem + ".start")).write_text(str(time.time()))
if a.fail:
    sys.exit("it broke")
print("fake output", a.value)
a.json.write_text(json.dumps({"speed": {"value": a.value, "unit": "x", "baseline": "a fake",
                                        "goal": "<= 2.0"}}))
"""


@pytest.fixture()
def run_all(tmp_path, monkeypatch):
    module = load("run_all")
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("first", "second", "third", "broken"):
        (bench / f"{name}.py").write_text(FAKE)
    monkeypatch.setattr(module, "BENCH", bench)
    monkeypatch.setattr(
        module,
        "BENCHES",
        [
            module.Bench("second", ["--value", "1.5"], "a lane benchmark"),
            module.Bench("broken", ["--value", "1", "--fail"], "one that fails"),
            module.Bench("first", ["--value", "3.0"], "a benchmark run alone", alone=True),
            module.Bench("third", ["--value", "0.5"], "another lane benchmark"),
        ],
    )
    return module


def test_make_bench_runs_every_benchmark_and_records_a_failure_without_stopping(run_all, tmp_path):
    # Prepare: four fake benchmarks, one alone, one failing
    out = tmp_path / "results"

    # Execute
    code = run_all.main(["--out", str(out), "--lanes", "2"])

    # Assert: exit 1 for the failure, every other figure written with its verdict, in BENCHES'
    # order (not completion order)
    assert code == 1
    data = json.loads(out.with_suffix(".json").read_text())
    assert list(data["results"]) == ["second", "broken", "first", "third"]
    assert data["results"]["broken"]["status"] == "failed"
    assert "it broke" in data["results"]["broken"]["reason"]
    assert data["meta"]["lanes"] == 2
    table = out.with_suffix(".md").read_text()
    assert "| first | speed | 3.00x | a fake | <= 2.0 (NOT met) |" in table
    assert "| second | speed | 1.50x | a fake | <= 2.0 (met) |" in table
    assert table.index("| second |") < table.index("| first |")


def test_a_benchmark_marked_alone_runs_before_the_lanes(run_all, tmp_path, monkeypatch):
    starts: list[str] = []
    original = run_all.run_bench

    def spy(bench, tmp):
        starts.append(bench.name)
        return original(bench, tmp)

    monkeypatch.setattr(run_all, "run_bench", spy)
    run_all.main(["--out", str(tmp_path / "results"), "--lanes", "1"])
    assert starts[0] == "first"
    assert starts[1:] == ["second", "broken", "third"]


def test_the_aggregation_bench_pairs_each_call_with_a_copy():
    aggregation = load("aggregation")
    row = aggregation.worker("flora", layers=1, dim=64, repeats=3, report=True, warmup=1)
    assert row["ratio"] > 0 and row["seconds"] > 0 and row["copy_seconds"] > 0
    assert row["noise"] < 1e-5  # flora is exact: the bench times the real aggregation
    assert row["input_bytes"] == sum(aggregation.RANKS) * 2 * 64 * 2 * 4  # q,v; A and B; fp32
