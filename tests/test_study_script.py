"""scripts/study.py: the run matrix and the paired 95% intervals it reports."""

from __future__ import annotations

import importlib.util
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
    first = study.matrix()[:18]  # seed 0 of every run comes before any second seed
    assert all(r.seed == 0 for r in first) and study.matrix()[18].seed == 1
    shifted = study.Run("heterogeneous", "flora", 0, "shifted").overrides()
    assert "data.shift_client=0" in shifted and "seed=0" in shifted
    central = study.Run("heterogeneous", "centralized", 1).overrides()
    assert "federation.centralized=true" in central and "train.max_steps=30" in central
