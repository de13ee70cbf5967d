"""A robustness setting: one client's data shifted to a single category.

``shift_to_category`` rewrites a partition so that client ``client`` holds rows of one label
only, as many as it held before: each of its rows of another label is swapped, one for one, with
a row of ``category`` drawn (seeded) from the other clients, so every other client keeps its
size and every row stays in exactly one client. If the other clients hold too few rows of
``category``, the shifted client keeps all there are and its remaining rows go to the other
clients in turn (it shrinks; nothing is dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

from flora.data._seed import make_rng
from flora.errors import FloraError

__all__ = ["shift_to_category"]


def shift_to_category(
    parts: Sequence[Sequence[int]], labels: Sequence[str], client: int, category: str, seed: int
) -> list[list[int]]:
    """``parts`` with client ``client`` holding only rows labelled ``category`` (sorted lists)."""
    if not 0 <= client < len(parts):
        raise FloraError(
            f"data.shift_client = {client} is not a client; pick 0 to "
            f"{len(parts) - 1}, or -1 for no shift"
        )
    if category not in set(labels):
        raise FloraError(
            f"data.shift_category = {category!r} is not a label of the training "
            f"rows; use one of {sorted(set(labels))}"
        )
    out = [list(part) for part in parts]
    others = [i for i in out[client] if labels[i] != category]
    pool = [
        (k, i) for k, part in enumerate(out) if k != client for i in part if labels[i] == category
    ]
    order = make_rng(seed, 7).permutation(len(pool)).tolist()
    pool = [pool[j] for j in order]
    mine = [i for i in out[client] if labels[i] == category]
    for j, row in enumerate(others):
        if j < len(pool):  # swap: the donor takes this row, the shifted client its category row
            donor, taken = pool[j]
            out[donor][out[donor].index(taken)] = row
            mine.append(taken)
        else:  # no category rows left to swap in: hand the row on, round robin
            receivers = [k for k in range(len(out)) if k != client]
            out[receivers[(j - len(pool)) % len(receivers)]].append(row)
    out[client] = mine
    if not mine:
        raise FloraError(f"data.shift_category = {category!r}: no training row holds it")
    return [sorted(part) for part in out]
