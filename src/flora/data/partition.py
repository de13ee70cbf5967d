"""Splitting row indices across clients (IID, Dirichlet label skew, label shards).

Every function is pure and seeded: the same arguments give the same split on any machine.
Each returns one sorted list of row indices per client, every index assigned exactly once.
Split off the held-out rows first (``split_heldout``), then partition the training rows' labels
and map the returned positions back through the training indices.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from flora.data._seed import make_rng
from flora.errors import FloraError

__all__ = [
    "SCHEMES",
    "client_table",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "split_heldout",
]

SCHEMES = ("iid", "dirichlet", "shards")
_DIRICHLET_TRIES = 100


def partition_iid(n: int, num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle ``range(n)`` and cut it into ``num_clients`` parts whose sizes differ by <= 1."""
    _check_clients(n, num_clients, min_size=1)
    order = make_rng(seed).permutation(n)
    return _sorted_parts(np.array_split(order, num_clients))


def partition_dirichlet(
    labels: Sequence[str], num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Label skew: each label's rows go to clients in proportions drawn from Dir(alpha).

    Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification" (2019), https://arxiv.org/abs/1909.06335. Small alpha gives each
    client few labels; large alpha approaches IID. Draws again until every client holds at
    least ``min_size`` rows, at most 100 times.
    """
    n = len(labels)
    if not alpha > 0:
        raise FloraError(f"data.alpha must be > 0 for the dirichlet scheme, got {alpha}")
    if min_size < 0:
        raise FloraError(f"data.min_size must be >= 0, got {min_size}")
    _check_clients(n, num_clients, min_size=max(min_size, 1))
    rng = make_rng(seed)
    by_label = _indices_by_label(labels)
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for rows in by_label:
            shuffled = rng.permutation(rows)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(int)
            for client, chunk in enumerate(np.split(shuffled, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [sorted(part) for part in parts]
    raise FloraError(
        f"partition_dirichlet: no draw in {_DIRICHLET_TRIES} gave each of {num_clients} clients "
        f">= {min_size} rows with alpha={alpha}; raise data.alpha or lower data.num_clients"
    )


def partition_shards(
    labels: Sequence[str], num_clients: int, shards_per_client: int, seed: int
) -> list[list[int]]:
    """Pathological non-IID: sort rows by label, cut into shards, deal each client some shards.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data"
    (2017), https://arxiv.org/abs/1602.05629. Rows are shuffled within each label first. A shard
    is contiguous in label order, so it may straddle a label boundary: a client holds at most
    ``shards_per_client`` labels only when label counts are multiples of the shard size.
    """
    n = len(labels)
    if shards_per_client < 1:
        raise FloraError(f"data.shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    _check_clients(n, num_clients, min_size=1)
    if n < num_shards:
        raise FloraError(
            f"partition_shards: {n} rows cannot fill {num_clients} x {shards_per_client} shards; "
            f"lower data.shards_per_client or data.num_clients"
        )
    rng = make_rng(seed)
    codes = _label_codes(labels)
    shuffled = rng.permutation(n)
    by_label = shuffled[np.argsort(codes[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _sorted_parts([np.concatenate([shards[s] for s in row]) for row in dealt])


def partition(
    labels: Sequence[str],
    *,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[list[int]]:
    """Dispatch to ``partition_<scheme>``; ``alpha`` and ``shards_per_client`` apply to one each."""
    if scheme == "iid":
        return partition_iid(len(labels), num_clients, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha, seed)
    if scheme == "shards":
        return partition_shards(labels, num_clients, shards_per_client, seed)
    raise FloraError(f"data.partition must be one of {list(SCHEMES)}, got {scheme!r}")


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


def _check_clients(n: int, num_clients: int, *, min_size: int) -> None:
    if num_clients < 1:
        raise FloraError(f"data.num_clients must be >= 1, got {num_clients}")
    if n < num_clients * min_size:
        raise FloraError(
            f"{n} rows cannot give {num_clients} clients {min_size} row(s) each; "
            f"lower data.num_clients or use more data"
        )


def _label_codes(labels: Sequence[str]) -> np.ndarray:
    """Integer code per row, codes in sorted label order (independent of row order)."""
    names = sorted(set(labels))
    index = {name: code for code, name in enumerate(names)}
    return np.array([index[label] for label in labels], dtype=np.int64)


def _indices_by_label(labels: Sequence[str]) -> list[np.ndarray]:
    codes = _label_codes(labels)
    return [np.flatnonzero(codes == code) for code in range(int(codes.max(initial=-1)) + 1)]


def _sorted_parts(parts: Sequence[np.ndarray]) -> list[list[int]]:
    return [sorted(part.tolist()) for part in parts]
