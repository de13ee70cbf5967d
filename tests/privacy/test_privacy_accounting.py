"""flora.privacy.accounting and the ledger: flora's epsilon is opacus' for the same mechanism."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from flora.config import load_config
from flora.errors import FloraError
from flora.privacy.accounting import client_budget, epsilon_spent, noise_for, sample_budget
from flora.privacy.config import PrivacyConfig
from flora.privacy.ledger import Ledger

TINY = "configs/tiny.toml"


def _stepped(accountant, noise: float, rate: float, steps: int, delta: float) -> float:
    for _ in range(steps):  # the library's own way: one step() call per noisy step
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize(
    ("noise", "rate", "steps"), [(1.1, 0.01, 500), (0.6, 0.2, 40), (2.0, 1.0, 3)]
)
def test_epsilon_equals_the_rdp_accountant_stepped_the_same(noise, rate, steps):
    expected = _stepped(RDPAccountant(), noise, rate, steps, 1e-5)
    assert epsilon_spent(noise, rate, steps, 1e-5, "rdp") == pytest.approx(expected, rel=1e-12)


def test_epsilon_equals_the_prv_accountant_stepped_the_same():
    expected = _stepped(PRVAccountant(), 1.0, 0.05, 200, 1e-5)
    assert epsilon_spent(1.0, 0.05, 200, 1e-5, "prv") == pytest.approx(expected, rel=1e-6)


def test_no_noise_is_infinite_epsilon_and_no_step_is_zero():
    assert epsilon_spent(0.0, 0.1, 10, 1e-5) == math.inf
    assert epsilon_spent(1.0, 0.1, 0, 1e-5) == 0.0


@pytest.mark.parametrize("target", [8.0, 2.0, 0.5])
def test_the_noise_found_for_a_target_spends_at_most_the_target(target):
    noise = noise_for(target, 1e-5, 0.05, 300, "rdp", "a test")
    spent = epsilon_spent(noise, 0.05, 300, 1e-5)
    assert spent <= target
    assert spent > target - 0.02  # opacus' tolerance is 0.01: the least noise that meets it
    assert epsilon_spent(noise * 0.9, 0.05, 300, 1e-5) > target


def test_a_target_no_noise_can_meet_is_refused_naming_the_keys():
    with pytest.raises(FloraError, match=r"privacy\.epsilon = 1e-09 .* cannot be met for a test"):
        noise_for(1e-9, 1e-5, 1.0, 1000, "rdp", "a test")


def test_sample_budget_takes_rate_steps_and_delta_from_the_client():
    config = load_config(TINY, ['privacy.mode="dp-sgd"', "privacy.epsilon=4"])
    budget = sample_budget(config.privacy, config.train, 40, rounds=2, client=0)
    assert budget.sample_rate == 4 / 40  # batch_size 4, grad_accum 1
    assert budget.steps_per_round == 4 and budget.delta == 1 / 40  # train.max_steps = 4
    assert budget.epsilon(2 * 4) <= 4.0
    explicit = PrivacyConfig(mode="dp-sgd", delta=1e-6, noise_multiplier=1.5)
    fixed = sample_budget(explicit, config.train, 40, rounds=2, client=0)
    assert fixed.noise_multiplier == 1.5 and fixed.delta == 1e-6


def test_a_client_smaller_than_a_batch_is_refused():
    config = load_config(TINY, ['privacy.mode="dp-sgd"', "train.batch_size=8"])
    with pytest.raises(FloraError, match="client 3 holds 5 examples, fewer than a batch"):
        sample_budget(config.privacy, config.train, 5, rounds=2, client=3)


def test_client_budget_samples_clients_at_m_over_k():
    config = load_config(
        TINY,
        [
            'privacy.mode="client-level"',
            "privacy.epsilon=6",
            "federation.method='fedit'",
            "lora.ranks=[4, 4, 4]",
            "federation.rounds=5",
        ],
    )
    budget = client_budget(config.privacy, config.federation, sampled=2)
    assert budget.sample_rate == 2 / 3 and budget.delta == 1 / 3 and budget.steps_per_round == 1
    assert 5.98 < budget.epsilon(5) <= 6.0


def test_the_ledger_counts_every_upload_and_survives_a_restore():
    config = load_config(TINY, ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0"])
    ledger = Ledger(config, [40, 40, 30], sampled=3)
    ledger.record([(0, 40, 4), (2, 30, 4)])
    ledger.record([(0, 40, 4)])
    row = ledger.client_fields(0)
    assert row["private_steps"] == 8
    assert row["epsilon"] == pytest.approx(epsilon_spent(1.0, 0.1, 8, 1 / 40))
    assert ledger.client_fields(1)["epsilon"] == 0.0  # never trained: nothing spent
    again = Ledger(config, [40, 40, 30], sampled=3)
    again.restore(ledger.state())
    assert again.client_fields(0) == row


def test_a_target_that_cannot_be_met_refuses_the_run_before_it_trains(tmp_path):
    from flora import simulation

    config = load_config(
        TINY, ['privacy.mode="dp-sgd"', "privacy.epsilon=1e-6", "privacy.delta=1e-5"]
    )
    with pytest.raises(FloraError, match="cannot be met for client 0"):
        simulation.run(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
