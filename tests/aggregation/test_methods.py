"""Method-specific behaviour: FedIT's closed-form noise, zero-padding's truncation, SVDs, bytes."""

from __future__ import annotations

import math

import pytest
import torch

from flora.aggregation import aggregate, measure
from flora.aggregation.florist import threshold_rank
from flora.aggregation.validate import normalize_weights

from .conftest import SHAPES, exact_delta, make_clients, relative_error


def test_fedit_noise_equals_its_closed_form():
    # Prepare: two clients with equal scaling s; FedIT's gap is s p1 p2 (B1 - B2)(A1 - A2)
    c1, c2 = make_clients([4, 4], alphas=[8.0, 8.0], seed=3)
    p1, p2 = 0.25, 0.75
    # Execute
    result = aggregate("fedit", [c1, c2], [p1, p2])
    report = measure([c1, c2], [p1, p2], result)
    # Assert
    assert report.noise > 1e-2
    for module in SHAPES:
        s = c1[module].scaling
        gap = s * p1 * p2 * (c1[module].B - c2[module].B) @ (c1[module].A - c2[module].A)
        exact = exact_delta([c1, c2], [p1, p2], module)
        torch.testing.assert_close(
            exact.float() - result.realised_delta(module), gap, rtol=1e-4, atol=1e-4
        )
        expected = float(torch.linalg.matrix_norm(gap.double()) / torch.linalg.matrix_norm(exact))
        assert report.noise_per_module[module] == pytest.approx(expected, rel=1e-4)


def test_zero_padding_truncation_round_trip():
    # Prepare: ranks 8 and 4, weights 1/4 and 3/4
    big, small = make_clients([8, 4], seed=5)
    result = aggregate("zero-padding", [big, small], [1.0, 3.0])
    for module in SHAPES:
        g = result.global_factors[module]
        b, s = big[module], small[module]
        # the first 4 components average both clients; the last 4 come from the big one alone
        torch.testing.assert_close(g.A[:4], 0.25 * b.A[:4] + 0.75 * s.A)
        torch.testing.assert_close(g.A[4:], 0.25 * b.A[4:])
        torch.testing.assert_close(g.B[:, 4:], 0.25 * b.scaling * b.B[:, 4:])
        # the small client downloads exactly the first 4 components
        down = result.download(1)[module]
        assert down.rank == 4
        torch.testing.assert_close(down.A, g.A[:4])
        torch.testing.assert_close(down.B, g.B[:, :4])
        assert result.download(0)[module].rank == 8


def test_zero_padding_single_client_round_trips_exactly():
    (client,) = make_clients([6])
    result = aggregate("zero-padding", [client])
    for module, factors in client.items():
        torch.testing.assert_close(result.download(0)[module].delta(), factors.delta())


def test_zero_padding_norm_weighting_follows_update_norms():
    # Prepare: client 1 is client 0 with a 3x larger update, so HetLoRA weights are 1/4 and 3/4
    (client,) = make_clients([4], seed=9)
    louder = {m: type(f)(f.A, 3.0 * f.B, f.scaling) for m, f in client.items()}
    # Execute: the example weights say the opposite, and must be ignored
    result = aggregate("zero-padding", [client, louder], [9.0, 1.0], weighting="norm")
    # Assert
    for module, f in client.items():
        g = result.global_factors[module]
        torch.testing.assert_close(g.A, f.A)
        torch.testing.assert_close(g.B, (0.25 + 0.75 * 3.0) * f.scaling * f.B)


def test_flexlora_downloads_are_the_best_rank_r_approximations():
    clients = make_clients([8, 4, 2], seed=11)
    weights = [1.0, 1.0, 2.0]
    result = aggregate("flexlora", clients, weights)
    for module in SHAPES:
        exact = exact_delta(clients, weights, module)
        S = torch.linalg.svdvals(exact)
        for k, rank in enumerate([8, 4, 2]):
            error = float(
                torch.linalg.matrix_norm(result.download(k)[module].delta().double() - exact)
            )
            tail = float(S[rank:].square().sum().sqrt())  # Eckart-Young: the optimal error
            assert error == pytest.approx(tail, rel=1e-4, abs=1e-5 * float(S.norm()))


@pytest.mark.parametrize(
    ("values", "tau", "energy", "expected"),
    [
        ([4.0, 3.0, 2.0, 1.0], 1.0, "sum", 4),
        ([4.0, 3.0, 2.0, 1.0], 0.7, "sum", 2),  # 7/10
        ([4.0, 3.0, 2.0, 1.0], 0.71, "sum", 3),
        ([4.0, 3.0, 2.0, 1.0], 0.8, "squared", 2),  # 25/30 = 0.83
        ([4.0, 3.0, 0.0, 0.0], 1.0, "sum", 2),  # zero singular values are never kept
        ([0.0, 0.0], 0.5, "sum", 1),
    ],
)
def test_florist_threshold_rank(values, tau, energy, expected):
    assert threshold_rank(torch.tensor(values), tau, energy) == expected


def test_florist_below_one_drops_only_the_tail():
    clients = make_clients([8, 8, 8], seed=2)
    result = aggregate("florist", clients, tau=0.5)
    report = measure(clients, normalize_weights(None, 3), result)
    assert 0 < report.noise < 1
    assert all(rank < 24 for rank in report.global_ranks.values())


@pytest.mark.parametrize(
    ("method", "up_parts", "down"),
    [
        ("flora", "AB", lambda r, o, i: sum(r) * (o + i)),
        ("fedit", "AB", lambda r, o, i: r[0] * (o + i)),
        ("ffa-lora", "B", lambda r, o, i: r[0] * o),
        ("fedex-lora", "AB", lambda r, o, i: r[0] * (o + i) + o * i),
    ],
)
def test_bytes_up_and_down(method, up_parts, down):
    ranks = [4, 4, 4]
    clients = make_clients(ranks, shared_A=method == "ffa-lora")
    result = aggregate(method, clients)
    per_element = 4  # float32
    expected_down = sum(down(ranks, o, i) for o, i in SHAPES.values()) * per_element
    assert result.bytes_down == [expected_down] * 3
    width = {"AB": lambda o, i: o + i, "B": lambda o, i: o}[up_parts]
    assert result.bytes_up == [sum(r * width(o, i) for o, i in SHAPES.values()) * 4 for r in ranks]


def test_redistributing_methods_send_each_client_its_own_rank():
    ranks = [8, 4, 2]
    clients = make_clients(ranks)
    for method in ("zero-padding", "flexlora"):
        result = aggregate(method, clients)
        assert result.bytes_down == [r * sum(o + i for o, i in SHAPES.values()) * 4 for r in ranks]


def test_weights_default_to_equal_and_normalise():
    assert normalize_weights(None, 4) == [0.25] * 4
    assert normalize_weights([2, 6], 2) == [0.25, 0.75]
    assert math.isclose(sum(normalize_weights([3, 1, 7], 3)), 1.0)


def test_flora_report_is_relative_to_the_independent_dense_sum():
    clients = make_clients([5, 3])
    result = aggregate("flora", clients, [2.0, 1.0])
    for module in SHAPES:
        assert (
            relative_error(result.realised_delta(module), exact_delta(clients, [2.0, 1.0], module))
            < 1e-6
        )
