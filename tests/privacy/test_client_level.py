"""flora.privacy.client_level: the client's clipped update and the server's noise."""

from __future__ import annotations

import pytest
import torch

from flora.factors import LoraFactors
from flora.privacy.client_level import clip_update, noise_average, noise_generator, update_norm


def _adapter(seed: int, scaling: float = 1.0, modules: int = 3) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"m{i}": LoraFactors(
            torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), scaling
        )
        for i in range(modules)
    }


def test_a_large_update_is_scaled_onto_the_bound_over_all_modules_together():
    start, trained = _adapter(0), _adapter(1, scaling=2.0)
    norm = update_norm(trained, start)
    clipped, before = clip_update(trained, start, bound=norm / 10)
    assert before == pytest.approx(norm)
    assert update_norm(clipped, start) == pytest.approx(norm / 10, rel=1e-5)
    for module, f in clipped.items():  # the same direction, a tenth of the length
        s, t = start[module], trained[module].with_scaling(1.0)
        torch.testing.assert_close(f.B - s.B, (t.B - s.B) / 10, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f.A - s.A, (t.A - s.A) / 10, rtol=1e-5, atol=1e-6)
        assert f.scaling == 1.0


def test_a_small_update_passes_unchanged():
    start, trained = _adapter(0), _adapter(1, scaling=2.0)
    clipped, _ = clip_update(trained, start, bound=1e9)
    for module, f in clipped.items():
        t = trained[module].with_scaling(1.0)
        torch.testing.assert_close(f.A, t.A, rtol=0, atol=1e-6)
        torch.testing.assert_close(f.B, t.B, rtol=0, atol=1e-6)


def test_a_frozen_A_is_left_bitwise_and_counts_for_nothing():
    start = _adapter(0)
    trained = {m: LoraFactors(f.A.clone(), f.B + 1.0, 1.0) for m, f in start.items()}
    clipped, norm = clip_update(trained, start, bound=0.5, trains="B")
    assert norm == pytest.approx((3 * 8 * 4) ** 0.5)  # B moved by 1 everywhere; A not at all
    assert all(torch.equal(clipped[m].A, trained[m].A) for m in start)
    assert update_norm(clipped, start, trains="B") == pytest.approx(0.5, rel=1e-5)


def test_the_server_noise_has_the_asked_std_and_spares_a_frozen_A():
    average = {m: LoraFactors(torch.zeros(4, 400), torch.zeros(300, 4), 1.0) for m in "ab"}
    noised = noise_average(average, 0.3, noise_generator(0, 1, reproducible=True))
    z = torch.cat([torch.cat([f.A.reshape(-1), f.B.reshape(-1)]) for f in noised.values()])
    assert abs(float(z.mean())) < 0.01 and float(z.std()) == pytest.approx(0.3, rel=0.02)
    frozen = noise_average(average, 0.3, noise_generator(0, 1, True), trains="B")
    assert all(torch.equal(frozen[m].A, average[m].A) for m in "ab")
    assert not torch.equal(frozen["a"].B, average["a"].B)


def test_reproducible_noise_repeats_and_secret_noise_does_not():
    draw = [
        torch.randn(8, generator=noise_generator(3, 2, reproducible=r))
        for r in (True, True, False, False)
    ]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[2], draw[3]) and not torch.equal(draw[0], draw[2])
    assert not torch.equal(draw[0], torch.randn(8, generator=noise_generator(3, 3, True)))
