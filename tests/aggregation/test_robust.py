"""Coordinate-wise median and trimmed mean (flora.aggregation.robust, Yin et al. ICML 2018) and
the ``robust`` option of the methods that average factors (fedit, ffa-lora)."""

from __future__ import annotations

import pytest
import torch

from flora.aggregation import aggregate
from flora.aggregation.robust import coordinate_median, trimmed_mean
from flora.config import load_config
from flora.errors import FloraError
from flora.factors import LoraFactors


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_median_equals_the_sorted_middle_for_odd_and_even_counts():
    # Prepare: 5 and 4 tensors of random values
    five = [_randn(3, 4, seed=s) for s in range(5)]
    # Execute / Assert: the third of five sorted values, the mean of the middle two of four
    stacked = torch.stack(five)
    assert torch.equal(coordinate_median(five), stacked.sort(dim=0).values[2])
    ordered = torch.stack(five[:4]).sort(dim=0).values
    assert torch.allclose(coordinate_median(five[:4]), (ordered[1] + ordered[2]) / 2)


def test_a_minority_of_hostile_values_cannot_move_the_median_outside_the_honest_range():
    # Prepare: 7 honest tensors and 3 hostile ones at +-1e6
    honest = [_randn(5, 6, seed=s) for s in range(7)]
    hostile = [torch.full((5, 6), 1e6), torch.full((5, 6), -1e6), torch.full((5, 6), 1e6)]
    # Execute
    median = coordinate_median(honest + hostile)
    trimmed = trimmed_mean(honest + hostile, 0.3)
    # Assert: both stay between the honest minimum and maximum, coordinate by coordinate
    low, high = torch.stack(honest).min(0).values, torch.stack(honest).max(0).values
    for estimate in (median, trimmed):
        assert bool(((estimate >= low) & (estimate <= high)).all())


def test_trimmed_mean_drops_floor_trim_k_at_each_end_and_trim_zero_is_the_mean():
    values = [torch.tensor([float(v)]) for v in (1, 2, 3, 4, 100)]
    assert trimmed_mean(values, 0.0).item() == pytest.approx(22.0)
    assert trimmed_mean(values, 0.2).item() == pytest.approx(3.0)  # drops 1 and 100
    assert trimmed_mean(values, 0.1).item() == pytest.approx(22.0)  # floor(0.5) = 0: none
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(values, 0.5)


def _clients(k: int, rank: int = 2, shared_A: bool = False) -> list[dict[str, LoraFactors]]:
    A0 = _randn(rank, 6, seed=99)
    return [
        {
            "q": LoraFactors(
                A0.clone() if shared_A else _randn(rank, 6, seed=s),
                _randn(4, rank, seed=50 + s),
                0.5 + s,
            )
        }
        for s in range(k)
    ]


@pytest.mark.parametrize("method", ["fedit", "ffa-lora"])
def test_the_robust_option_estimates_the_factors_unweighted_with_the_scaling_folded(method):
    # Prepare: 5 clients with different scalings and uneven example counts
    clients = _clients(5, shared_A=method == "ffa-lora")
    examples = [1.0, 1.0, 1.0, 1.0, 1000.0]
    # Execute
    result = aggregate(method, clients, examples, robust="median")
    # Assert: B is the median of s_k B_k, A the median of the A_k (ffa-lora: the shared A)
    got = result.global_factors["q"]
    B = coordinate_median([c["q"].B * c["q"].scaling for c in clients])
    A = coordinate_median([c["q"].A for c in clients])
    assert got.scaling == 1.0 and torch.allclose(got.B, B) and torch.allclose(got.A, A)


@pytest.mark.parametrize("method", ["fedit", "ffa-lora"])
def test_equal_uploads_give_themselves_whatever_the_estimator(method):
    one = _clients(1, shared_A=True)[0]
    clients = [dict(one) for _ in range(4)]
    for robust in ("mean", "median", "trimmed-mean"):
        got = aggregate(method, clients, [1.0, 2.0, 3.0, 4.0], robust=robust).global_factors["q"]
        assert torch.allclose(got.B @ got.A, one["q"].scaling * one["q"].B @ one["q"].A, atol=1e-6)


def test_a_one_in_three_hostile_fedit_client_is_outvoted_by_the_median():
    # Prepare: two honest clients close together, one sending 50x its B
    clients = _clients(3)
    clients[2] = {
        "q": LoraFactors(clients[1]["q"].A, clients[1]["q"].B * 50, clients[1]["q"].scaling)
    }
    honest = aggregate("fedit", clients[:2], [1.0, 1.0]).global_factors["q"]
    # Execute
    mean = aggregate("fedit", clients, [1.0, 1.0, 1.0]).global_factors["q"]
    median = aggregate("fedit", clients, [1.0, 1.0, 1.0], robust="median").global_factors["q"]
    # Assert: the median's B lies between the honest ones; the mean's is dragged 17x away
    b0, b1 = (c["q"].B * c["q"].scaling for c in clients[:2])
    assert bool(((torch.minimum(b0, b1) <= median.B) & (torch.maximum(b0, b1) >= median.B)).all())
    assert (mean.B - honest.B).norm() > 5 * (median.B - honest.B).norm()


def test_options_are_checked_and_client_level_dp_refuses_a_robust_estimator():
    with pytest.raises(FloraError, match="trim"):
        load_config(
            "configs/tiny.toml",
            ["federation.method=fedit", "lora.ranks=[2, 2, 2]", "federation.options.trim=0.5"],
        )
    with pytest.raises(FloraError, match="robust"):
        load_config(
            "configs/tiny.toml",
            [
                "federation.method=fedit",
                "lora.ranks=[2, 2, 2]",
                "federation.options.robust=median",
                "privacy.mode=client-level",
            ],
        )
    config = load_config(
        "configs/tiny.toml",
        [
            "federation.method=ffa-lora",
            "lora.ranks=[2, 2, 2]",
            "federation.options.robust=trimmed-mean",
        ],
    )
    assert config.federation.options["robust"] == "trimmed-mean"
