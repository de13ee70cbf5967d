"""Partitions across clients: coverage, determinism, skew, and the held-out split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from flora.data import (
    SCHEMES,
    client_table,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    split_heldout,
)
from flora.errors import FloraError

# 8 labels of unequal sizes, like Dolly's categories, in sorted order like Dolly's file
SIZES = {"a": 300, "b": 180, "c": 170, "d": 140, "e": 140, "f": 120, "g": 100, "h": 50}
LABELS = [label for label, size in SIZES.items() for _ in range(size)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("num_clients", "seed"), [(1, 0), (5, 1), (10, 7), (40, 3)])
def test_every_index_exactly_once(scheme: str, num_clients: int, seed: int) -> None:
    parts = partition(LABELS, scheme=scheme, num_clients=num_clients, seed=seed, alpha=1.0)

    assert len(parts) == num_clients
    assert sorted(i for part in parts for i in part) == list(range(len(LABELS)))
    assert all(part == sorted(part) and part for part in parts)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_split_other_seed_other_split(scheme: str) -> None:
    first = partition(LABELS, scheme=scheme, num_clients=6, seed=11)
    again = partition(LABELS, scheme=scheme, num_clients=6, seed=11)
    other = partition(LABELS, scheme=scheme, num_clients=6, seed=12)

    assert first == again
    assert first != other


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(part) for part in partition_iid(1003, 10, seed=0)]

    assert max(sizes) - min(sizes) <= 1


def label_share_spread(parts: list[list[int]]) -> float:
    """Mean over clients of the largest label share: 1.0 is one label each, ~0.22 is IID here."""
    return float(np.mean([max(Counter(LABELS[i] for i in p).values()) / len(p) for p in parts]))


@pytest.mark.parametrize(("alpha", "low", "high"), [(0.05, 0.5, 1.0), (1000.0, 0.0, 0.3)])
def test_dirichlet_skew_follows_alpha(alpha: float, low: float, high: float) -> None:
    parts = partition_dirichlet(LABELS, num_clients=8, alpha=alpha, seed=0)

    assert low <= label_share_spread(parts) <= high


def test_dirichlet_large_alpha_gives_near_equal_sizes() -> None:
    parts = partition_dirichlet(LABELS, num_clients=4, alpha=1000.0, seed=0)

    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 0.1 * len(LABELS) / 4


def test_dirichlet_min_size_is_respected() -> None:
    parts = partition_dirichlet(LABELS, num_clients=10, alpha=0.5, seed=0, min_size=20)

    assert min(len(part) for part in parts) >= 20


def test_dirichlet_gives_up_with_advice() -> None:
    with pytest.raises(FloraError, match=r"raise data\.alpha or lower data\.num_clients"):
        partition_dirichlet(LABELS, num_clients=100, alpha=0.01, seed=0, min_size=10)


@pytest.mark.parametrize(("num_clients", "shards_per_client"), [(4, 2), (8, 1), (2, 4)])
def test_shards_bound_labels_per_client(num_clients: int, shards_per_client: int) -> None:
    # Prepare: equal label blocks that are whole multiples of the shard size
    labels = [label for label in "abcdefgh" for _ in range(25)]

    # Execute
    parts = partition_shards(labels, num_clients, shards_per_client, seed=3)

    # Assert
    assert all(len({labels[i] for i in part}) <= shards_per_client for part in parts)
    assert {len(part) for part in parts} == {len(labels) // num_clients}


def test_shards_straddle_at_most_one_boundary_per_shard() -> None:
    parts = partition_shards(LABELS, num_clients=10, shards_per_client=2, seed=0)

    assert all(len({LABELS[i] for i in part}) <= 2 * 2 for part in parts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "random"}, r"one of \['iid', 'dirichlet', 'shards'\]"),
        ({"scheme": "iid", "num_clients": 0}, "num_clients must be >= 1"),
        ({"scheme": "iid", "num_clients": 10_000}, r"lower data\.num_clients"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
        ({"scheme": "shards", "shards_per_client": 0}, "shards_per_client must be >= 1"),
        ({"scheme": "shards", "num_clients": 700}, "cannot fill"),
        ({"scheme": "iid", "seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_arguments_are_flora_errors(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"num_clients": 4, "seed": 0, **kwargs}

    with pytest.raises(FloraError, match=message):
        partition(LABELS, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "fraction", "held"), [(100, 0.1, 10), (15_011, 0.05, 751), (7, 0.0, 0)]
)
def test_heldout_split_is_disjoint_complete_and_deterministic(
    n: int, fraction: float, held: int
) -> None:
    train, heldout = split_heldout(n, fraction, seed=5)

    assert len(heldout) == held
    assert sorted(train + heldout) == list(range(n))
    assert not set(train) & set(heldout)
    assert split_heldout(n, fraction, seed=5) == (train, heldout)
    if held:
        assert split_heldout(n, fraction, seed=6) != (train, heldout)


@pytest.mark.parametrize(("n", "fraction"), [(10, 1.0), (10, -0.1), (1, 0.6)])
def test_heldout_bad_fraction(n: int, fraction: float) -> None:
    with pytest.raises(FloraError, match="heldout_fraction"):
        split_heldout(n, fraction, seed=0)


def test_client_table_lists_rows_and_label_mix() -> None:
    labels = ["x", "x", "x", "y", "z", "w", "v"]
    parts = [[0, 1, 2, 3], [4, 5, 6]]

    table = client_table(parts, labels, top=2)

    lines = table.splitlines()
    assert lines[0].split() == ["client", "rows", "label", "mix"]
    assert lines[1].split()[:2] == ["0", "4"]
    assert "x 75%, y 25%" in lines[1]
    assert lines[2].endswith("+1 more")
    assert lines[-1].split()[:2] == ["total", "7"]
    assert all(line[6:8] == line[15:17] == "  " for line in lines)  # fixed-width columns
