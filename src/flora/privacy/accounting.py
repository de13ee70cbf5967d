"""(epsilon, delta) accounting through opacus' accountants: the noise for a target, the spend.

Both modes are the sampled Gaussian mechanism, composed over steps: DP-SGD's local steps
(each a Poisson sample of a client's examples at rate batch / n) and client-level DP's rounds
(each a sample of the clients at rate m / K). The accountant is opacus' RDP (Mironov et al.,
2019) or PRV (Gopi et al., 2021) accountant, given the mechanism's history
``[(noise_multiplier, sample_rate, steps)]``; nothing here re-derives their bounds.

Sample-level budgets assume the client takes part in every round (its worst case: client
sampling is not counted as amplification), so the spend flora reports is never below the truth.
Client-level sampling in flora draws a fixed number m of the K clients, not each with
probability m / K as the accountant assumes; Flower's and TensorFlow Federated's DP strategies
make the same approximation, which is exact at full participation (rate 1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flora.config import FederationConfig, RunConfig, TrainConfig
from flora.errors import FloraError
from flora.privacy.config import PrivacyConfig

if TYPE_CHECKING:
    from flora.privacy.dp_sgd import DPSGD

__all__ = [
    "Budget",
    "client_budget",
    "dp_sgd_plan",
    "epsilon_spent",
    "noise_for",
    "sample_budget",
]


@dataclass(frozen=True)
class Budget:
    """One protected party's Gaussian mechanism: a client's examples (dp-sgd) or the clients."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int  # mechanism steps in one round it takes part in
    delta: float
    accountant: str

    def epsilon(self, steps: int) -> float:
        """The epsilon spent after ``steps`` steps (inf without noise, 0 before any step)."""
        return epsilon_spent(
            self.noise_multiplier, self.sample_rate, steps, self.delta, self.accountant
        )


def epsilon_spent(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of ``steps`` compositions of the sampled Gaussian mechanism, at ``delta``."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import create_accountant  # opacus loads in ~0.6 s: only when used

    engine = create_accountant(mechanism=accountant)
    engine.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a loose bound, kept
        warnings.simplefilter("ignore", UserWarning)
        epsilon = float(engine.get_epsilon(delta=delta))
    # RDP's conversion can dip below 0 when delta is large (near 1/n, a delta that would allow
    # publishing an example outright): the guarantee is then epsilon = 0 at that delta
    return max(0.0, epsilon)


def noise_for(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, what: str
) -> float:
    """The smallest noise multiplier (to opacus' tolerance) that spends at most ``epsilon``
    over ``steps`` steps; ``what`` names the party and its steps in the refusal."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
            noise = get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        return float(noise)
    except ValueError:
        raise FloraError(
            f"privacy.epsilon = {epsilon:g} at delta {delta:.3g} cannot be met for {what}: even "
            "a noise multiplier of 1e6 spends more; raise privacy.epsilon or privacy.delta, or "
            "take fewer steps (train.max_steps, train.local_epochs, federation.rounds)"
        ) from None


def sample_budget(
    privacy: PrivacyConfig, train: TrainConfig, examples: int, rounds: int, client: int
) -> Budget:
    """DP-SGD's mechanism on a client holding ``examples`` examples: Poisson batches of
    expected size batch_size x grad_accum, train.total_steps(examples) steps a round, and the
    noise for privacy.epsilon over all ``rounds`` (or privacy.noise_multiplier)."""
    expected = train.batch_size * train.grad_accum
    if expected > examples:
        raise FloraError(
            f"privacy.mode = 'dp-sgd': client {client} holds {examples} examples, fewer than a "
            f"batch (train.batch_size x train.grad_accum = {expected}); lower train.batch_size "
            "or train.grad_accum, or give each client more data"
        )
    rate = expected / examples
    steps = train.total_steps(examples)
    delta = privacy.delta_for(examples)
    noise = privacy.noise_multiplier
    if privacy.epsilon > 0:
        what = f"client {client} ({examples} examples, {steps} steps x {rounds} rounds at rate "
        noise = noise_for(
            privacy.epsilon, delta, rate, steps * rounds, privacy.accountant, what + f"{rate:.3g})"
        )
    return Budget(noise, rate, steps, delta, privacy.accountant)


def client_budget(privacy: PrivacyConfig, federation: FederationConfig, sampled: int) -> Budget:
    """Client-level DP's mechanism: ``sampled`` of federation.num_clients a round, one step a
    round, and the noise for privacy.epsilon over federation.rounds (or the given one)."""
    clients = federation.num_clients
    rate = sampled / clients
    delta = privacy.delta_for(clients)
    noise = privacy.noise_multiplier
    if privacy.epsilon > 0:
        what = f"the clients ({sampled} of {clients} a round, {federation.rounds} rounds)"
        noise = noise_for(privacy.epsilon, delta, rate, federation.rounds, privacy.accountant, what)
    return Budget(noise, rate, 1, delta, privacy.accountant)


def dp_sgd_plan(config: RunConfig, examples: int, client: int) -> DPSGD | None:
    """What DP-SGD a client holding ``examples`` examples trains with (None unless
    privacy.mode = "dp-sgd"): the same on the client that trains and the server that accounts."""
    privacy = config.privacy
    if privacy.mode != "dp-sgd":
        return None
    from flora.privacy.dp_sgd import DPSGD

    budget = sample_budget(privacy, config.train, examples, config.federation.rounds, client)
    expected = config.train.batch_size * config.train.grad_accum
    return DPSGD(
        budget.noise_multiplier, privacy.max_grad_norm, expected, privacy.reproducible_noise
    )
