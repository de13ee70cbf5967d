"""Bad and hostile clients, on the embedded runtime and on the Flower apps (in-process grid):
each upload is screened before aggregation, a rejected one is named in metrics.jsonl and left
out, and the federation goes on (flora.aggregation.screen, flora.server.Server.aggregate)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.faults import tamper as t

from flora import simulation
from flora.config import RunConfig, load_config
from flora.errors import FloraError
from flora.metrics import read_metrics

TINY = "configs/tiny.toml"
FAST = [
    "train.max_steps=1",
    "train.batch_size=2",
    "eval.samples=0",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=48",
]
RUNTIMES = ["embedded", "flower"]


def run(config: RunConfig, out: Path, runtime: str) -> Path:
    if runtime == "embedded":
        simulation.run(config, out, quiet=True)
        return out
    pytest.importorskip("flwr")
    from tests.flower.inline_grid import InlineGrid

    from flora.flower.client_app import make_client_app
    from flora.flower.server_app import run_server

    grid = InlineGrid(make_client_app(out.parent / "nodes"), config.federation.num_clients)
    run_server(grid, config, out, {})
    return out


def rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def max_weight(run_dir: Path) -> float:
    tensors = load_file(run_dir / "final" / "model" / "model.safetensors")
    return max(float(v.abs().max()) for v in tensors.values())


CASES = {
    # rejected with norm_action = "reject" (the default clips: see the test below)
    "x1e10": (t.scaled(1e10), "exceeds 3 x the others' median (per sqrt(rank))"),
    "rank + 2": (t.extra_rank(2), "has rank 6, the client was assigned 4"),
    "1e12 examples": (t.examples(10**12), "exceeds its partition's"),
    "NaN": (t.nan(), "holds NaN or inf"),
    "Inf": (t.inf(), "holds NaN or inf"),
    "a wrong shape": (t.narrower_A(), "is 64x63, the layer is 64x64"),
    "zero examples": (t.examples(0), "not a whole number >= 1"),
    "a missing module": (t.missing_module(), "lacks module"),
    "an exception": (t.raises(), "RuntimeError: injected"),
}


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_upload_is_named_and_left_out(tmp_path, tamper, case, runtime, capsys):
    # Prepare: client 1 (rank 4) is hostile or broken in round 1 of 2
    change, reason = CASES[case]
    tamper(1, 1, change)
    reject = ["screening.norm_action=reject"] if case == "x1e10" else []
    config = load_config(TINY, [*FAST, *reject, "federation.rounds=2"])
    # Execute
    run_dir = run(config, tmp_path / "run", runtime)
    # Assert: one fault row naming it, the others aggregated, round 2 as usual, a sane model
    (fault,) = rows(run_dir, "fault")
    assert (fault["round"], fault["client"]) == (1, 1) and reason in fault["reason"]
    assert fault["stage"] == ("client" if case == "an exception" else "screening")
    servers = rows(run_dir, "server")
    assert [(r["clients"], r["failed"]) for r in servers] == [([0, 2], [1]), ([0, 1, 2], [])]
    assert max_weight(run_dir) < 10
    if fault["stage"] == "screening":  # said on the console too, in one line
        err = capsys.readouterr().err
        assert f"flora: round 1, client 1 left out: {fault['reason'][10:]}" in err


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_clipping_keeps_a_hostile_update_within_the_bound(tmp_path, tamper, runtime, capsys):
    # Prepare: the default screen clips at 3 x the others' median (of norm / sqrt(rank))
    tamper(1, 1, t.scaled(1e10))
    config = load_config(TINY, [*FAST, "federation.rounds=1"])
    # Execute
    run_dir = run(config, tmp_path / "run", runtime)
    # Assert: used, clipped by about 1e-10, the final model sane
    (server,) = rows(run_dir, "server")
    assert server["clients"] == [0, 1, 2] and not rows(run_dir, "fault")
    assert 1e-12 < server["clipped"]["1"] < 1e-9
    assert max_weight(run_dir) < 10
    # every client row has its upload's norm as sent, and its ratio to the round's median
    ratios = {r["client"]: r["norm_ratio"] for r in rows(run_dir, "client")}
    assert ratios[1] > 1e8 and all(0.1 < ratios[k] < 10 for k in (0, 2))
    # ... and what the bound compares: its largest module against the others' median
    modules = {r["client"]: r["module_norm_ratio"] for r in rows(run_dir, "client")}
    assert modules[1] > 1e8 and all(modules[k] < 3 for k in (0, 2))
    assert "flora: round 1, client 1's update clipped by" in capsys.readouterr().err


def test_an_absolute_bound_rejects_what_it_should(tmp_path, tamper):
    tamper(2, 1, t.scaled(1e3))
    config = load_config(
        TINY,
        [
            *FAST,
            "screening.max_update_norm=1.0",
            "screening.norm_action=reject",
            "federation.rounds=1",
            "screening.norm_multiple=0",
        ],
    )
    run_dir = run(config, tmp_path / "run", "embedded")
    (fault,) = rows(run_dir, "fault")
    assert fault["client"] == 2 and "exceeds max_update_norm 1" in fault["reason"]


def test_integer_factors_are_refused(tmp_path, tamper):
    tamper(0, 1, t.integer())
    run_dir = run(load_config(TINY, [*FAST, "federation.rounds=1"]), tmp_path / "run", "embedded")
    (fault,) = rows(run_dir, "fault")
    assert fault["client"] == 0 and "expected floating point" in fault["reason"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_too_few_usable_uploads_stop_the_run_with_the_last_state_intact(tmp_path, tamper, runtime):
    # Prepare: all three must count; client 0 is hostile in round 2
    tamper(0, 2, t.scaled(1e10))
    sets = ["federation.min_clients=3", "federation.rounds=2", "screening.norm_action=reject"]
    config = load_config(TINY, [*FAST, *sets])
    # Execute
    with pytest.raises(FloraError, match=r"round 2 failed: 2 usable upload\(s\) of 3 sampled"):
        run(config, tmp_path / "run", runtime)
    # Assert: round 1's checkpoint is the last one, and the fault is on record
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["round_0001"]
    (fault,) = rows(tmp_path / "run", "fault")
    assert fault["round"] == 2 and "exceeds" in fault["reason"]


def test_the_screened_run_equals_one_without_the_bad_client(tmp_path, tamper):
    """Left out means left out: client 1's rejected upload changes nothing that a failure of
    client 1 would not (the same model bitwise)."""
    tamper(1, 1, t.scaled(1e10))
    config = load_config(TINY, [*FAST, "federation.rounds=1", "screening.norm_action=reject"])
    hostile = run(config, tmp_path / "hostile", "embedded")
    tamper(1, 1, t.raises())
    failed = run(config, tmp_path / "failed", "embedded")
    ours, theirs = (load_file(d / "final/model/model.safetensors") for d in (hostile, failed))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_client_speaking_for_another_is_left_out(tmp_path, tamper, runtime):
    # Prepare: client 1's result claims to be client 0's
    tamper(1, 1, lambda r: dataclasses.replace(r, client=0))
    config = load_config(TINY, [*FAST, "federation.rounds=1"])
    # Execute
    run_dir = run(config, tmp_path / "run", runtime)
    # Assert: client 1 named and left out; client 0's own upload used once
    (fault,) = rows(run_dir, "fault")
    assert fault["client"] == 1
    claims = "a reply of partition 0" if runtime == "flower" else "claims client 0"
    assert claims in fault["reason"]
    (server,) = rows(run_dir, "server")
    assert server["clients"] == [0, 2]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_exception_inside_training_is_named_and_the_base_stays_clean(tmp_path, runtime):
    """Client 1 raises mid-step, with its LoRA injected: the run goes on, and (embedded, one
    shared base) the model is bitwise the one of a run where client 1 simply failed."""
    config = load_config(TINY, [*FAST, "federation.rounds=2"])
    undo = t.crash_in_training(1, 1)
    try:
        crashed = run(config, tmp_path / "crashed", runtime)
    finally:
        undo()
    (fault,) = rows(crashed, "fault")
    assert fault["client"] == 1 and "RuntimeError: injected mid-training" in fault["reason"]
    servers = rows(crashed, "server")
    assert [(r["clients"], r["failed"]) for r in servers] == [([0, 2], [1]), ([0, 1, 2], [])]
    undo = t.tamper(1, 1, t.raises())
    try:
        failed = run(config, tmp_path / "failed", runtime)
    finally:
        undo()
    ours, theirs = (load_file(d / "final/model/model.safetensors") for d in (crashed, failed))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
