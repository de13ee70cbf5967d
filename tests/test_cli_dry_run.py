"""`flora run --dry-run`: the resolved config, the data tables and the bytes per round and client,
then exit 0 without writing anything; the bytes are those a real run records."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import flora.simulation as simulation
from flora.cli import main
from flora.config import config_from_dict, load_config
from flora.dry_run import config_toml, round_traffic
from flora.engine import GlobalModel
from flora.metrics import read_metrics
from flora.models import resolved_config
from flora.packaged import shipped_configs
from flora.server import Server

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")
FAST = ["federation.rounds=3", "train.max_steps=1", "eval.samples=0", "threads=1"]


def test_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path, monkeypatch, capsys, torch_single_thread
):
    # Prepare: an empty working directory
    monkeypatch.chdir(tmp_path)
    # Execute
    assert (
        main(
            [
                "run",
                TINY,
                "--dry-run",
                "--set",
                "federation.method='ffa-lora'",
                "--set",
                "lora.ranks=[4, 4, 4]",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # Assert: the resolved config loads back, the tables are there, nothing was written
    toml = out.split("\n\ndevice ")[0]
    config = load_config(TINY, ["federation.method='ffa-lora'", "lora.ranks=[4, 4, 4]"])
    assert config_from_dict(tomllib.loads(toml)) == resolved_config(config)
    assert "target_modules = [" in toml  # the architecture's defaults, written out
    assert "4 target layers: 2 x q_proj (64x64), 2 x v_proj (32x64)" in out
    assert "label mix" in out and "held-out kept" in out  # the client and category tables
    # ffa-lora sends B only: 4 x (64 + 32) x 2 layers x 4 bytes = 3.0 KiB, up and down
    assert "1-2             0     4     3.0 KiB     3.0 KiB" in out
    assert "without --dry-run the run goes to runs/tiny-" in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_refuses_a_resume(capsys):
    assert main(["run", "--dry-run", "--resume", "runs/x"]) == 2
    assert "--dry-run checks a new run's config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides",
    [
        ["federation.fraction=0.6"],  # 2 of 3 clients a round: catch-up of missed rounds
        ["federation.method='fedex-lora'", "lora.ranks=[4, 4, 4]"],  # a dense residual down
        ["federation.method='zero-padding'"],  # a global LoRA cut to each rank
    ],
    ids=["flora-partial", "fedex-lora", "zero-padding"],
)
def test_the_dry_run_s_bytes_are_the_run_s(tmp_path, overrides, torch_single_thread):
    # Prepare
    config = load_config(TINY, FAST + overrides)
    model = GlobalModel(resolved_config(config), "cpu")
    sizes = [len(examples) for examples in model.data.clients]
    # Execute: the dry run's count, and a real run
    planned = round_traffic(Server(resolved_config(config), model.shapes, sizes), sizes)
    simulation.run(config, tmp_path / "run", quiet=True)
    # Assert: the same clients, ranks and bytes, round by round
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "client"]
    assert [(t.round, t.client, t.rank, t.up, t.down) for t in planned] == [
        (r["round"], r["client"], r["rank"], r["bytes_up"], r["bytes_down"]) for r in rows
    ]
    assert any(t.down for t in planned)


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_config_toml_loads_back_to_the_same_config(name):
    overrides = [
        "federation.method='florist'",
        "federation.options.tau=0.9",
        "flower.client_gpus=0.5",
        "train.lr=1e-05",
    ]
    for config in (load_config(shipped_configs()[name]), load_config(TINY, overrides)):
        assert config_from_dict(tomllib.loads(config_toml(config))) == config


def test_a_value_dependent_download_is_counted_at_its_largest(tmp_path, torch_single_thread):
    """catch_up = "svd" sends the missed updates re-factored at their numerical rank: random
    uploads have the full rank, so the dry run's download bounds the run's from above."""
    config = load_config(TINY, [*FAST, "federation.fraction=0.6", "federation.catch_up='svd'"])
    model = GlobalModel(resolved_config(config), "cpu")
    sizes = [len(examples) for examples in model.data.clients]
    planned = round_traffic(Server(resolved_config(config), model.shapes, sizes), sizes)
    simulation.run(config, tmp_path / "run", quiet=True)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "client"]
    assert [(t.round, t.client, t.up) for t in planned] == [
        (r["round"], r["client"], r["bytes_up"]) for r in rows
    ]
    assert all(t.down >= r["bytes_down"] for t, r in zip(planned, rows, strict=True))
