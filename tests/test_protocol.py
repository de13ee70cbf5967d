"""Catch-up (flora.protocol.catch_up): what a client that missed rounds downloads, exactly."""

from __future__ import annotations

import pytest
import torch

from flora.factors import LoraFactors
from flora.protocol import RoundUpdate, catch_up


def _updates(rank: int, count: int, out: int = 8, inp: int = 6) -> list[RoundUpdate]:
    g = torch.Generator().manual_seed(rank)
    return [
        RoundUpdate(
            t,
            {
                "m": LoraFactors(
                    torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), 1.0
                )
            },
        )
        for t in range(1, count + 1)
    ]


@pytest.mark.parametrize(
    ("rank", "count", "chosen"),
    [
        (1, 2, "replay"),  # 2 ranks of (8 + 6): 28 elements, under dense's 48 and svd's 28 (tie)
        (2, 3, "dense"),  # 6 ranks: replay 84, svd at rank 6 84, dense 48
        (4, 1, "replay"),  # one missed update is sent as it was
    ],
)
def test_auto_sends_the_fewest_bytes_and_the_exact_sum(rank, count, chosen):
    missed = _updates(rank, count)
    sent, size = catch_up(missed, "auto")
    exact = sum(u.deltas()["m"].double() for u in missed)
    got = sum(u.deltas()["m"].double() for u in sent)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-5)
    kind = "dense" if sent[0].residual is not None else ("replay" if len(sent) == count else "svd")
    assert kind == chosen and size == sum(u.nbytes() for u in sent)
    assert size <= min(catch_up(missed, "replay")[1], catch_up(missed, "svd")[1])
