"""flora.aggregation.screen: what the server accepts of an upload, as pure functions."""

from __future__ import annotations

import pytest
import torch

from flora.aggregation.screen import ScreenRules, Upload, screen, update_norm
from flora.factors import LoraFactors

SHAPES = {"q": (6, 5), "v": (4, 5)}


def _client(seed: int, rank: int = 2, scale: float = 1.0) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: LoraFactors(
            torch.randn(rank, i, generator=g), scale * torch.randn(o, rank, generator=g), 0.5
        )
        for m, (o, i) in SHAPES.items()
    }


def test_the_norm_from_the_factors_is_the_dense_one():
    for f in _client(0, rank=3).values():
        dense = f.scaling * (f.B.double() @ f.A.double())
        assert update_norm(f) == pytest.approx(float(dense.norm()), rel=1e-12)


def test_one_hostile_client_of_two_is_caught_by_the_others_median():
    uploads = [Upload(0, _client(0), 10), Upload(1, _client(1, scale=1e6), 10)]
    result = screen(uploads, SHAPES, ScreenRules(norm_multiple=100))
    assert [u.client for u in result.accepted] == [0] and "others' median" in result.rejected[1]


def test_clipping_lands_exactly_on_the_bound():
    uploads = [Upload(k, _client(k, scale=1e4 if k == 2 else 1), 10) for k in range(3)]
    result = screen(uploads, SHAPES, ScreenRules(max_update_norm=2.0, norm_action="clip"))
    for upload in result.accepted:
        assert all(update_norm(f) <= 2.0 for f in upload.factors.values())
    assert 0 < result.clipped[2] < 1e-3 and not result.rejected


def test_no_yardstick_no_relative_bound():
    zero = {m: LoraFactors(f.A, torch.zeros_like(f.B), f.scaling) for m, f in _client(0).items()}
    result = screen([Upload(0, zero, 1), Upload(1, _client(1), 1)], SHAPES, ScreenRules(10))
    assert len(result.accepted) == 2


def _with_zero_A(adapter):
    return {m: LoraFactors(torch.zeros_like(f.A), f.B, f.scaling) for m, f in adapter.items()}


@pytest.mark.parametrize(
    ("upload", "reason"),
    [
        (Upload(0, _client(0, rank=3), 5, rank=2), "has rank 3, the client was assigned 2"),
        (Upload(0, _client(0), 5.5), "not a whole number"),
        (Upload(0, _client(0), 0), "not a whole number >= 1"),
        (Upload(0, _client(0), 50, known_examples=40), "exceeds its partition's 40"),
        (
            Upload(0, _client(0), 5, sent=_with_zero_A(_client(0)), frozen=frozenset("A")),
            "differs from the frozen A",
        ),
        (Upload(0, {"q": _client(0)["q"]}, 5), "lacks module 'v'"),
    ],
)
def test_structural_reasons(upload, reason):
    result = screen([upload], SHAPES, ScreenRules())
    assert not result.accepted and reason in result.rejected[0]
