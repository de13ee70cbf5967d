"""The attack harness (tests/faults/attacks.py) and what the default screen and the robust
estimators do against it: a client that scales its update 50x every round, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.faults.attacks import Attack, arm, attacked, damage

from flora import simulation
from flora.client import ClientResult
from flora.config import ScreeningConfig, load_config
from flora.factors import LoraFactors
from flora.metrics import read_metrics
from flora.protocol import ClientTask

TINY = "configs/tiny.toml"
FAST = [
    "train.max_steps=2",
    "train.batch_size=2",
    "eval.samples=0",
    "data.limit=90",
    "data.heldout=8",
    "data.max_length=48",
    "federation.rounds=2",
]
MODULES = ["q_proj", "v_proj"]


def _result(factors: dict[str, LoraFactors]) -> ClientResult:
    return ClientResult(client=0, round=1, factors=factors, examples=4)


def _factors(seed: int, rank: int = 2) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, 6, generator=g), torch.randn(5, rank, generator=g), 2.0)


def test_a_fresh_lora_attack_scales_the_update_exactly():
    # Prepare: FLoRA's task (no init: a fresh LoRA, B_0 = 0)
    honest = _factors(0)
    task = ClientTask(client=0, round=1, rank=2, alpha=4.0, seed=0)
    # Execute
    for c in (50.0, -1.0):
        (moved,) = attacked(_result({"q": honest}), task, c).factors.values()
        # Assert: s B A scaled by c, to rounding
        assert torch.allclose(moved.delta(), c * honest.delta(), atol=1e-5)


def test_a_global_lora_attack_moves_only_what_trained():
    # Prepare: a client of FFA-LoRA (trains B over the frozen A it was sent)
    start = _factors(1).with_scaling(1.0)
    upload = LoraFactors(start.A, start.B / 2.0 + 0.1, 2.0)  # trained B, as the client returns it
    task = ClientTask(
        client=0, round=2, rank=2, alpha=4.0, seed=0, init={"q": start}, trains=frozenset({"B"})
    )
    # Execute
    (moved,) = attacked(_result({"q": upload}), task, 5.0).factors.values()
    # Assert: A exactly as sent; B moved 5 times as far from its start (at the upload's scaling)
    B0 = start.with_scaling(2.0).B
    assert torch.equal(moved.A, upload.A)
    assert torch.allclose(moved.B - B0, 5.0 * (upload.B - B0), atol=1e-6)


def _run(tmp: Path, name: str, attack: Attack | None, *overrides: str) -> Path:
    config = load_config(TINY, [*FAST, *overrides])
    undo = arm(attack) if attack else (lambda: None)
    try:
        simulation.run(config, tmp / name, quiet=True)
    finally:
        undo()
    return tmp / name


def _clipped(run_dir: Path) -> list[list[str]]:
    return [
        sorted(r["clipped"])
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r["kind"] == "server"
    ]


@pytest.mark.usefixtures("torch_single_thread")
def test_the_default_screen_bounds_a_50x_scaler_that_the_old_one_let_through(tmp_path):
    # Prepare: the default screen is a clip at a few times the others' median
    default = ScreeningConfig()
    assert default.norm_action == "clip" and default.norm_multiple <= 10
    scaler = Attack("scale50", (1,), 50.0)
    honest = _run(tmp_path, "honest", None)
    # Execute
    old = _run(
        tmp_path, "old", scaler, "screening.norm_multiple=100", "screening.norm_action=reject"
    )
    new = _run(tmp_path, "new", scaler)
    # Assert: the old bound let it through untouched; the default clips it every round and its
    # damage to the final update is a fraction of the old's
    assert _clipped(old) == [[], []] and _clipped(new) == [["1"], ["1"]]
    assert damage(new, honest, MODULES) < damage(old, honest, MODULES) / 4


@pytest.mark.usefixtures("torch_single_thread")
def test_fedits_median_outvotes_one_scaler_of_three(tmp_path):
    # Prepare: FedIT at equal ranks; client 1 scales its update 50x every round
    fedit = ["federation.method=fedit", "lora.ranks=[4, 4, 4]", "screening.norm_multiple=0"]
    scaler = Attack("scale50", (1,), 50.0)
    honest = _run(tmp_path, "honest", None, *fedit)
    # Execute
    mean = _run(tmp_path, "mean", scaler, *fedit)
    median = _run(tmp_path, "median", scaler, *fedit, "federation.options.robust=median")
    # Assert: the median stays near the honest run where the mean is dragged away
    assert damage(median, honest, MODULES) < damage(mean, honest, MODULES) / 4
