"""scripts/study.py: the run matrix and the paired 95% intervals it reports."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "scripts" / "study.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module
    spec.loader.exec_module(module)
    return module


def test_the_t_quantiles_are_students(study):
    for dof, quantile in study.T95.items():
        assert quantile == pytest.approx(stats.t.ppf(0.975, dof), abs=1e-3)


def test_the_paired_interval_is_the_t_interval_of_the_differences(study):
    diffs = [0.012, -0.004, 0.020]
    mean, low, high = study.paired_interval(diffs)
    expected = stats.t.interval(0.95, len(diffs) - 1, loc=mean, scale=stats.sem(diffs))
    assert (low, high) == pytest.approx(expected, rel=1e-3)
    assert math.isnan(study.paired_interval([0.1])[1])


def test_every_comparison_has_both_sides_and_centralized_gets_k_times_the_steps(study):
    runs = {(r.setting, r.method, r.seed, r.variant) for r in study.matrix()}
    assert len(runs) == len(study.matrix()) == 26 + 2 + 4
    assert len({r.name for r in study.matrix()}) == len(runs)
    for setting, a, b, variant in study.COMPARISONS:
        key = not variant and a in study.KEY[setting] and b in study.KEY[setting]
        for seed in study.KEY_SEEDS if key else (0,):  # the key comparisons: three seeds
            assert (setting, a, seed, variant) in runs and (setting, b, seed, variant) in runs
    key = study.matrix()[:21]  # the key comparisons' three seeds come before the other views
    assert {r.seed for r in key} == set(study.KEY_SEEDS)
    assert all(r.method in study.KEY[r.setting] and not r.variant for r in key)
    assert all(r.seed == 0 for r in study.matrix()[21:])
    shifted = study.Run("heterogeneous", "flora", 0, "shifted").overrides()
    assert "data.shift_client=0" in shifted and "seed=0" in shifted
    central = study.Run("heterogeneous", "centralized", 1).overrides()
    assert "federation.centralized=true" in central and "train.max_steps=30" in central


def fake_run(root: Path, name: str, losses: list[float], down: int, seconds: float) -> None:
    """A committed run: eval rows per round (per category too), client and server rows."""
    run = root / name
    run.mkdir(parents=True)
    rows = []
    for t, loss in enumerate(losses):
        final = t == len(losses) - 1
        rows.append(
            {
                "kind": "eval",
                "round": t,
                "heldout_loss": loss,
                "final": final,
                "per_category": {"open_qa": loss + 1.0, "summarization": loss - 1.0},
            }
        )
        if t:
            rows += [
                {"kind": "client", "round": t, "client": k, "bytes_down": down} for k in range(2)
            ]
            rows.append({"kind": "server", "round": t, "round_seconds": seconds})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"loss_before": losses[0], "loss_after": losses[-1], "seconds": seconds * 3}
    (run / "summary.json").write_text(json.dumps(summary))


def test_the_report_pairs_seeds_and_finds_the_target_round(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    for seed, gap in zip(study.KEY_SEEDS, (0.010, 0.020, 0.030), strict=True):
        fake_run(tmp_path, f"heter-flora-seed{seed}", [2.0, 1.9, 1.8, 1.7 - gap], 5_000_000, 10.0)
        fake_run(tmp_path, f"heter-zero-padding-seed{seed}", [2.0, 1.95, 1.9, 1.7], 1_000_000, 8.0)
    text = study.report()
    # flora - zero-padding over three seeds: mean -0.02, t-interval +-4.303 * 0.01 / sqrt(3)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert f"| heterogeneous | flora - zero-padding | 3 | -0.0200 | [{-0.02 - half:+.4f}, " in text
    assert f"{-0.02 + half:+.4f}] | -0.0100, -0.0200, -0.0300 |" in text  # and each seed's
    # target: halfway from 2.0 to flora's 1.69 = 1.845; flora reaches it after round 2 (1.8,
    # 2 rounds x 2 clients x 5 MB = 20 MB, 20 s), zero-padding after round 3 (1.7, 6 MB, 24 s)
    assert "| heterogeneous | 1.8450 | flora | 2 | 20 | 20 |" in text
    assert "| heterogeneous | 1.8450 | zero-padding | 3 | 6 | 24 |" in text
    assert "| summarization | -0.3100 | -0.3000 |" in text  # per category, seed 0's
    # seed 0's loss and change (one held-out set), then the change's mean over the seeds
    assert "| heterogeneous | flora | 3 | 1.6900 | -0.3100 | -0.3200 | 30 (10) | 30 |" in text


def test_the_forest_plot_draws_every_paired_comparison(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    for seed in study.KEY_SEEDS:
        fake_run(tmp_path, f"homog-flora-seed{seed}", [2.0, 1.8 + 0.01 * seed], 5, 1.0)
        fake_run(tmp_path, f"homog-fedit-seed{seed}", [2.0, 1.8], 1, 1.0)
    rows = study.paired(study.finished())
    assert [label for label, _ in rows] == ["flora - fedit (homog.)"]
    assert rows[0][1] == pytest.approx([0.0, 0.01, 0.02])
    study.forest_plot(study.finished(), tmp_path / "comparisons.png")
    assert (tmp_path / "comparisons.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_split_sweep_matrix_is_resumable_and_every_run_loads(study):
    sys.path.insert(0, str(ROOT / "scripts"))
    import splits
    from flora.config import load_config

    runs = splits.matrix()
    # 9 variants x (3 + 3 + 1) seeds x splits, and the int8 downlink at 9 x 1 (3 seeds) and 3 x 3
    assert len({r.name for r in runs}) == len(runs) == 63 + 4
    assert all(r.rounds * r.steps == splits.TOTAL for r in runs)
    assert [r.seed for r in runs[:18]] == [0] * 18  # the extremes' seed 0 first
    for run in runs[:9] + runs[-9:]:
        config = load_config(ROOT / "configs" / "study" / f"{run.setting}.toml", run.overrides())
        assert config.federation.rounds == run.rounds and config.train.max_steps == run.steps
    added = splits.matrix(["florist"])  # mixed ranks: both settings
    assert len(added) == 67 + 2 * 7 and any(r.variant == "florist" for r in added)
    added = splits.matrix(["rolora"])  # equal ranks: the homogeneous setting alone
    assert {r.setting for r in added if r.variant == "rolora"} == {"homogeneous"}
    assert len(added) == 67 + 7


def test_the_split_sweep_finds_each_methods_cheapest_split_to_a_target(
    study, tmp_path, monkeypatch
):
    sys.path.insert(0, str(ROOT / "scripts"))
    import splits

    monkeypatch.setattr(splits, "RESULTS", tmp_path)
    # fedit: 9 x 1 reaches -0.20 at 1 MB a client-round; flora: -0.10 at 9 x 1 (10 MB) and
    # -0.15 at 3 x 3 (10 MB); flora-warm: -0.20 at 3 x 3 (2 MB)
    cells = [("fedit", 9, -0.20, 1), ("flora", 9, -0.10, 10), ("flora", 3, -0.15, 10)]
    cells += [("flora-warm", 3, -0.20, 2)]
    for variant, rounds, change, mb in cells:
        for seed in (0, 1):
            name = splits.SplitRun("homogeneous", variant, rounds, seed).name
            fake_run(tmp_path, name, [2.0] * rounds + [2.0 + change], mb * 1_000_000, 1.0)
            (tmp_path / name / "config.json").write_text('{"federation": {}}')
    text = "\n".join(splits.bytes_to_target(set(splits.finished())))
    # targets: fedit's -0.20 and flora's -0.15 and -0.10; 2 clients a round in the fake runs
    assert "| -0.2000 (fedit 9x1) | - | 18 (9x1) | 12 (3x3) | - | - | - |" in text
    assert "| -0.1500 (flora 3x3) | 60 (3x3) | 18 (9x1) | 12 (3x3) |" in text
    assert "| -0.1000 (flora 9x1) | 60 (3x3) |" in text  # 3 x 3 cheaper than 9 x 1 (180)
