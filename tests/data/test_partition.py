"""Partitions across clients (flwr-datasets' partitioners behind flora's seeding): coverage,
determinism, skew, natural ids, one-line errors, and the held-out split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from flora.data import SCHEMES, client_table, partition, split_heldout
from flora.errors import FloraError

# 8 labels of unequal sizes, like Dolly's categories, in sorted order like Dolly's file
SIZES = {"a": 300, "b": 180, "c": 170, "d": 140, "e": 140, "f": 120, "g": 100, "h": 50}
LABELS = [label for label, size in SIZES.items() for _ in range(size)]
USERS = [f"user{i % 7}" for i in range(len(LABELS))]  # natural ids: 7 users
BY_LABEL = [s for s in SCHEMES if s != "natural-id"]


def split(scheme: str, num_clients: int, seed: int, **options: object) -> list[list[int]]:
    natural = {"natural_ids": USERS} if scheme == "natural-id" else {}
    return partition(
        LABELS, scheme=scheme, num_clients=num_clients, seed=seed, **natural, **options
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", BY_LABEL)
@pytest.mark.parametrize(("num_clients", "seed"), [(2, 0), (5, 1), (10, 7), (40, 3)])
def test_every_index_exactly_once(scheme: str, num_clients: int, seed: int) -> None:
    options = {"classes_per_client": 8} if scheme == "pathological" else {"alpha": 1.0}
    parts = split(scheme, num_clients, seed, **options)

    assert len(parts) == num_clients
    assert sorted(i for part in parts for i in part) == list(range(len(LABELS)))
    assert all(part == sorted(part) and part for part in parts)


@pytest.mark.parametrize("scheme", BY_LABEL)
def test_same_seed_same_split_other_seed_other_split(scheme: str) -> None:
    first = split(scheme, 10, 11)
    again = split(scheme, 10, 11)
    other = split(scheme, 10, 12)

    assert first == again
    assert first != other


def test_iid_sizes_differ_by_at_most_one_and_are_shuffled() -> None:
    parts = split("iid", 10, 0)
    sizes = [len(part) for part in parts]

    assert max(sizes) - min(sizes) <= 1
    assert len({LABELS[i] for i in parts[0]}) == len(SIZES)  # not a contiguous block of "a"


def label_share_spread(parts: list[list[int]]) -> float:
    """Mean over clients of the largest label share: 1.0 is one label each, ~0.22 is IID here."""
    return float(np.mean([max(Counter(LABELS[i] for i in p).values()) / len(p) for p in parts]))


@pytest.mark.parametrize(("alpha", "low", "high"), [(0.05, 0.5, 1.0), (1000.0, 0.0, 0.3)])
def test_dirichlet_skew_follows_alpha(alpha: float, low: float, high: float) -> None:
    parts = split("dirichlet", 8, 0, alpha=alpha)

    assert low <= label_share_spread(parts) <= high


def test_dirichlet_min_partition_size_is_respected() -> None:
    parts = split("dirichlet", 10, 0, alpha=0.5, min_partition_size=20)

    assert min(len(part) for part in parts) >= 20


def test_dirichlet_gives_up_with_advice_naming_real_keys() -> None:
    with pytest.raises(FloraError, match=r"raise data\.dirichlet_alpha.*federation\.num_clients"):
        split("dirichlet", 100, 0, alpha=0.01, min_partition_size=10)


@pytest.mark.parametrize(("num_clients", "shards_per_client"), [(4, 2), (8, 1), (2, 4)])
def test_shards_bound_labels_per_client(num_clients: int, shards_per_client: int) -> None:
    labels = [label for label in "abcdefgh" for _ in range(25)]  # blocks a multiple of a shard

    parts = partition(
        labels,
        scheme="shards",
        num_clients=num_clients,
        seed=3,
        shards_per_client=shards_per_client,
    )

    assert all(len({labels[i] for i in part}) <= shards_per_client for part in parts)
    assert {len(part) for part in parts} == {len(labels) // num_clients}


def test_pathological_gives_each_client_its_labels() -> None:
    parts = split("pathological", 12, 0, classes_per_client=2)

    assert all(len({LABELS[i] for i in part}) <= 2 for part in parts)


def test_natural_id_gives_one_client_per_id() -> None:
    parts = split("natural-id", 7, 0)

    assert [sorted({USERS[i] for i in part}) for part in parts] == [[f"user{k}"] for k in range(7)]
    assert sum(len(part) for part in parts) == len(LABELS)


@pytest.mark.parametrize(
    ("scheme", "kwargs", "message"),
    [
        ("random", {}, r"one of \['iid', 'dirichlet', 'shards', 'pathological', 'natural-id'\]"),
        ("iid", {"num_clients": 0}, r"federation\.num_clients must be >= 1"),
        ("iid", {"num_clients": 10_000}, r"lower federation\.num_clients or raise data\.limit"),
        ("shards", {"num_clients": 700}, "cannot fill"),
        ("iid", {"seed": -1}, "seed must be a non-negative integer"),
        ("natural-id", {"num_clients": 4}, r"set federation\.num_clients = 7"),
        ("pathological", {"num_clients": 2, "classes_per_client": 1}, "every label is dealt"),
    ],
)
def test_bad_arguments_are_flora_errors(
    scheme: str, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"num_clients": 4, "seed": 0, **kwargs}

    with pytest.raises(FloraError, match=message):
        split(scheme, **arguments)  # type: ignore[arg-type]


def test_label_schemes_need_several_labels() -> None:
    with pytest.raises(FloraError, match=r"set data\.label_column"):
        partition(["all"] * 50, scheme="dirichlet", num_clients=2, seed=0)


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
