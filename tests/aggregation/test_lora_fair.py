"""LoRA-FAIR's claim: correcting B reduces FedIT's aggregation noise to what lambda allows;
lambda = 0 is the least-squares correction (no B does better over the averaged A)."""

from __future__ import annotations

import itertools

import pytest
import torch

from flora.aggregation import aggregate, measure
from flora.aggregation.validate import normalize_weights

from .conftest import SHAPES, exact_delta, make_clients, relative_error

WEIGHTS = [1.0, 2.0, 3.0, 4.0]


def noise(method: str, **options: float) -> float:
    clients = make_clients([4, 4, 4, 4], seed=11, alphas=[8.0, 8.0, 4.0, 16.0])
    result = aggregate(method, clients, WEIGHTS, **options)
    return measure(clients, normalize_weights(WEIGHTS, 4), result).noise


def test_the_correction_cuts_fedits_noise_and_lambda_moves_it_back():
    fedit = noise("fedit")
    ladder = [noise("lora-fair", lam=lam) for lam in (0.0, 0.1, 1.0, 10.0, 1e6)]
    assert ladder[0] < 0.9 * fedit  # the least-squares correction removes part of the noise
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(ladder))  # monotone
    assert ladder[-1] == pytest.approx(fedit, rel=1e-3)  # lambda -> inf: FedIT's B


def test_lambda_zero_is_the_least_squares_b_over_the_averaged_A():
    clients = make_clients([4, 4, 4], seed=12)
    result = aggregate("lora-fair", clients, WEIGHTS[:3], lam=0.0)
    for module in SHAPES:
        A = result.global_factors[module].A.double()
        target = exact_delta(clients, WEIGHTS[:3], module)
        best = torch.linalg.lstsq(A.T, target.T).solution.T  # argmin_B ||B A - D||
        ours = result.global_factors[module]
        assert torch.equal(
            ours.A, aggregate("fedit", clients, WEIGHTS[:3]).global_factors[module].A
        )
        assert relative_error(ours.delta(), best @ A) < 1e-5


def test_identical_clients_come_back_and_bytes_are_fedits():
    clients = make_clients([4, 4], seed=13)
    result = aggregate("lora-fair", clients, [1.0, 3.0])
    assert result.bytes_up == aggregate("fedit", clients, [1.0, 3.0]).bytes_up
    assert result.bytes_down == [4 * sum(o + i for o, i in SHAPES.values()) * 4] * 2
