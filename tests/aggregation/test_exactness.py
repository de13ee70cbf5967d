"""Exactness claims: each method's realised update against sum_k p_k s_k B_k A_k."""

from __future__ import annotations

import pytest
import torch

from flora.aggregation import METHODS, aggregate, measure
from flora.aggregation.validate import normalize_weights

from .conftest import SHAPES, exact_delta, make_clients, relative_error

HETEROGENEOUS = [[8, 4, 2], [16, 8, 8, 4, 1], [3, 5], [24, 2, 9]]  # 24 = out: rank = layer dim


@pytest.mark.parametrize("ranks", HETEROGENEOUS)
@pytest.mark.parametrize(("method", "options"), [("flora", {}), ("florist", {"tau": 1.0})])
def test_stacking_methods_are_exact_for_mixed_ranks(ranks, method, options):
    # Prepare
    clients = make_clients(ranks, seed=len(ranks))
    weights = [float(10 * (k + 1)) for k in range(len(ranks))]
    # Execute
    result = aggregate(method, clients, weights, **options)
    # Assert
    for module in SHAPES:
        expected = exact_delta(clients, weights, module)
        assert relative_error(result.realised_delta(module), expected) < 1e-5
    assert measure(clients, normalize_weights(weights, len(ranks)), result).noise < 1e-5


def test_flora_global_rank_is_the_sum_of_ranks_with_scaling_one():
    clients = make_clients([8, 4, 2])
    result = aggregate("flora", clients)
    for factors in result.global_factors.values():
        assert factors.rank == 14 and factors.scaling == 1.0


SHARED_A = ("ffa-lora", "fedsvd", "rolora")  # B trained over one frozen A (rolora: odd rounds)


@pytest.mark.parametrize("method", ["fedex-lora", *SHARED_A])
def test_equal_rank_exact_methods(method):
    clients = make_clients([6, 6, 6], shared_A=method in SHARED_A, alphas=[6.0, 12.0, 3.0])
    weights = [1.0, 2.0, 5.0]
    result = aggregate(method, clients, weights)
    for module in SHAPES:
        assert (
            relative_error(result.realised_delta(module), exact_delta(clients, weights, module))
            < 1e-5
        )


FAITHFUL = [name for name, m in METHODS.items() if not m.defect]
# the reference code's zero-padding gives identical clients back once its merge scaling is the
# clients' own; its FedIT never does (tests/aggregation/test_reference_defects.py)
IDENTITY = {"florist": {"tau": 1.0}, "reference-zero-padding": {"merge_scaling": 1.0}}


@pytest.mark.parametrize("method", [*FAITHFUL, "reference-zero-padding"])
def test_identical_clients_give_the_input_back(method):
    # Prepare: three copies of one client (ffa-lora's shared A holds trivially)
    client = make_clients([4])[0]
    clients = [client, client, client]
    options = IDENTITY.get(method, {})
    # Execute
    result = aggregate(method, clients, [3.0, 1.0, 2.0], **options)
    # Assert: the realised update, and every client's download, equal the client's own update
    for module, factors in client.items():
        expected = factors.delta().double()
        assert relative_error(result.realised_delta(module), expected) < 1e-5
        for k in range(3):
            assert relative_error(result.download(k)[module].delta(), expected) < 1e-5


@pytest.mark.parametrize("method", [*FAITHFUL, "reference-zero-padding"])
def test_permutation_invariance(method):
    ranks = [8, 4, 2, 1] if METHODS[method].mixed_ranks else [4, 4, 4, 4]
    clients = make_clients(ranks, seed=7, shared_A=method in SHARED_A)
    weights = [1.0, 2.0, 3.0, 4.0]
    order = [2, 0, 3, 1]
    base = aggregate(method, clients, weights)
    permuted = aggregate(method, [clients[i] for i in order], [weights[i] for i in order])
    for module in SHAPES:
        torch.testing.assert_close(
            permuted.realised_delta(module), base.realised_delta(module), rtol=1e-4, atol=1e-4
        )
        for position, k in enumerate(order):
            torch.testing.assert_close(
                permuted.download(position)[module].delta(),
                base.download(k)[module].delta(),
                rtol=1e-4,
                atol=1e-4,
            )


@pytest.mark.parametrize(("out", "inp", "rank"), [(40, 30, 4), (6, 5, 40)])
def test_the_frobenius_norm_of_a_product_in_either_regime(out, inp, rank):
    # (40, 30) at rank 4: the Gram matrices (4 x 4); (6, 5) at rank 40: the 6 x 5 product,
    # as a stack of many clients over a small layer takes (memory never R^2)
    from flora.aggregation.lowrank import frobenius

    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g)
    expected = float(torch.linalg.matrix_norm(B.double() @ A.double()))
    assert frobenius(B, A) == pytest.approx(expected, rel=1e-10)
