"""Splitting training rows across clients with flwr-datasets' partitioners, and the seeded
held-out split.

``partition`` hands the rows' labels (and natural ids) to the partitioner a scheme names, as a
``datasets.Dataset``, seeded by the run's seed, and returns one sorted list of row positions per
client, every row in exactly one:

- ``iid``: ``IidPartitioner`` over the rows shuffled with the seed
- ``dirichlet``: ``DirichletPartitioner``, label skew (Hsu et al. 2019); ``dirichlet_alpha``,
  ``min_partition_size``
- ``shards``: ``ShardPartitioner`` (McMahan et al. 2017); ``shards_per_client``
- ``pathological``: ``PathologicalPartitioner``, a few labels per client; ``classes_per_client``
- ``natural-id``: ``NaturalIdPartitioner``, one client per user, source or site;
  ``natural_id_column``
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from flora.data._seed import make_rng
from flora.errors import FloraError

__all__ = ["SCHEMES", "client_table", "natural_clients", "partition", "split_heldout"]

SCHEMES = ("iid", "dirichlet", "shards", "pathological", "natural-id")
LABEL_SCHEMES = ("dirichlet", "shards", "pathological")


def natural_clients(natural_ids: Sequence[str]) -> int:
    """How many clients ``natural-id`` makes of these ids: one per distinct value."""
    return len(set(natural_ids))


def partition(
    labels: Sequence[str],
    *,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    min_partition_size: int = 1,
    shards_per_client: int = 2,
    classes_per_client: int = 2,
    natural_ids: Sequence[str] = (),
) -> list[list[int]]:
    """Row positions per client (sorted), from the flwr-datasets partitioner ``scheme`` names."""
    if scheme not in SCHEMES:
        raise FloraError(f"data.partition must be one of {list(SCHEMES)}, got {scheme!r}")
    n = len(labels)
    if num_clients < 1:
        raise FloraError(f"federation.num_clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise FloraError(
            f"{n} training rows cannot give {num_clients} clients a row each; "
            "lower federation.num_clients or raise data.limit"
        )
    if scheme in LABEL_SCHEMES and len(set(labels)) < 2:
        raise FloraError(
            f"data.partition = {scheme!r} splits by label, but the rows hold one "
            f"label ({labels[0]!r}); set data.label_column to a column with "
            "several values, or use 'iid'"
        )
    import datasets  # deferred: importing datasets costs seconds
    from flwr_datasets import partitioner as fp

    columns: dict[str, Any] = {"row": list(range(n)), "label": list(labels)}
    if scheme == "natural-id":
        if len(natural_ids) != n:
            raise FloraError("data.partition = 'natural-id' needs data.natural_id_column")
        found = natural_clients(natural_ids)
        if found != num_clients:
            raise FloraError(
                f"data.natural_id_column holds {found} distinct ids, so 'natural-id' "
                f"makes {found} clients: set federation.num_clients = {found} "
                f"and give lora.ranks {found} ranks"
            )
        columns["natural_id"] = list(natural_ids)
    dataset = datasets.Dataset.from_dict(columns)
    made: Any
    if scheme == "iid":
        made = fp.IidPartitioner(num_clients)
        dataset = dataset.select(make_rng(seed).permutation(n).tolist())
    elif scheme == "dirichlet":
        made = fp.DirichletPartitioner(
            num_clients, "label", alpha=alpha, min_partition_size=min_partition_size, seed=seed
        )
    elif scheme == "shards":
        if n < num_clients * shards_per_client:
            raise FloraError(
                f"{n} rows cannot fill {num_clients} x {shards_per_client} shards; "
                "lower data.shards_per_client or federation.num_clients"
            )
        made = fp.ShardPartitioner(
            num_clients,
            "label",
            num_shards_per_partition=shards_per_client,
            keep_incomplete_shard=True,
            seed=seed,
        )
    elif scheme == "pathological":
        made = fp.PathologicalPartitioner(  # client k's first label is label k: all are dealt
            num_clients,
            "label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    else:
        made = fp.NaturalIdPartitioner("natural_id")
    made.dataset = dataset
    try:
        with warnings.catch_warnings():  # its retry notices: the outcome is checked below
            warnings.simplefilter("ignore", UserWarning)
            parts = [sorted(made.load_partition(k)["row"]) for k in range(num_clients)]
    except ValueError as error:
        raise FloraError(
            f"data.partition = {scheme!r} with {num_clients} clients over {n} rows: "
            f"{error} ({_hint(scheme)})"
        ) from None
    used = sum(len(part) for part in parts)
    if used != n:  # e.g. a label no client was dealt: refuse rather than drop rows silently
        raise FloraError(f"data.partition = {scheme!r} placed {used} of {n} rows; {_hint(scheme)}")
    empty = [k for k, part in enumerate(parts) if not part]
    if empty:
        raise FloraError(
            f"data.partition = {scheme!r} left client(s) {empty} without rows; {_hint(scheme)}"
        )
    return parts


def _hint(scheme: str) -> str:
    return {
        "dirichlet": "raise data.dirichlet_alpha, lower data.min_partition_size or "
        "federation.num_clients, or raise data.limit",
        "shards": "lower data.shards_per_client or federation.num_clients",
        "pathological": "use at least as many clients as labels, or raise "
        "data.classes_per_client, so that every label is dealt to a client",
    }.get(scheme, "lower federation.num_clients or raise data.limit")


def split_heldout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) split of ``range(n)``; held-out holds round(n * fraction) rows."""
    if not 0.0 <= fraction < 1.0:
        raise FloraError(f"data.heldout_fraction must be in [0, 1), got {fraction}")
    size = round(n * fraction)
    if size >= n and n > 0:
        raise FloraError(
            f"data.heldout_fraction={fraction} leaves no training rows out of {n}; lower it"
        )
    order = make_rng(seed).permutation(n)
    return sorted(order[size:].tolist()), sorted(order[:size].tolist())


def client_table(parts: Sequence[Sequence[int]], labels: Sequence[str], top: int = 3) -> str:
    """A fixed-width table: each client's row count and its ``top`` labels with percentages."""
    lines = [f"{'client':>6}  {'rows':>7}  label mix"]
    for client, part in enumerate(parts):
        counts = Counter(labels[i] for i in part)
        mix = ", ".join(
            f"{label} {100 * count / len(part):.0f}%" for label, count in counts.most_common(top)
        )
        if len(counts) > top:
            mix += f", +{len(counts) - top} more"
        lines.append(f"{client:>6}  {len(part):>7}  {mix or '-'}")
    total = sum(len(part) for part in parts)
    lines.append(f"{'total':>6}  {total:>7}  {len(set(labels))} labels")
    return "\n".join(lines)
