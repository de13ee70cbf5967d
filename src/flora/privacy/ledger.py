"""The server's privacy ledger: what each client has spent, and the rows that report it.

DP-SGD (privacy.mode = "dp-sgd"): every upload a client sends (accepted or not: the server saw
it) is the release of one round of its private training, so its local steps are added to its
count; its epsilon is the accountant's for all of them, at its own sample rate and delta
(flora.privacy.accounting.sample_budget, from the example count the server knows or the client
reported). Client-level DP: every aggregation that adds noise is one step of the clients'
mechanism. The ledger is part of the server's checkpointed state, so a resumed run goes on
counting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from flora.config import RunConfig
from flora.privacy.accounting import Budget, client_budget, sample_budget

__all__ = ["Ledger"]


def _json(value: float) -> float | None:
    return value if math.isfinite(value) else None  # an infinite epsilon is written as null


class Ledger:
    """Steps spent per client (dp-sgd) or noised rounds (client-level), and their epsilon."""

    def __init__(self, config: RunConfig, sizes: Sequence[int] | None, sampled: int) -> None:
        """``sizes``: each client's partition size where the server knows it (then every
        client's budget is checked now: a target that cannot be met refuses the run);
        ``sampled``: clients a round."""
        self.config = config
        self.mode = config.privacy.mode
        clients = len(config.client_ranks())
        self.steps = [0] * clients
        self.examples: list[int | None] = list(sizes) if sizes is not None else [None] * clients
        self.rounds = 0
        self._budgets: dict[tuple[int, int], Budget] = {}
        self.clients: Budget | None = None
        if self.mode == "client-level":
            self.clients = client_budget(config.privacy, config.federation, sampled)
        if self.mode == "dp-sgd" and sizes is not None:
            for client, examples in enumerate(sizes):
                self.budget(client, examples)

    def budget(self, client: int, examples: int) -> Budget:
        key = (client, examples)
        if key not in self._budgets:
            rounds = self.config.federation.rounds
            self._budgets[key] = sample_budget(
                self.config.privacy, self.config.train, examples, rounds, client
            )
        return self._budgets[key]

    def record(self, uploads: Sequence[tuple[int, int, int]]) -> None:
        """(client, examples, steps) of every upload the server received this round."""
        if self.mode != "dp-sgd":
            return
        for client, examples, steps in uploads:
            if self.examples[client] is None and examples > 0:
                self.examples[client] = examples
            self.steps[client] += steps

    def noised(self) -> None:
        """One client-level aggregation with noise happened."""
        self.rounds += 1

    def client_fields(self, client: int) -> dict[str, Any]:
        """The privacy columns of a client row (dp-sgd): its epsilon so far, delta and noise."""
        examples = self.examples[client]
        if self.mode != "dp-sgd" or examples is None:
            return {}
        budget = self.budget(client, examples)
        return {
            "epsilon": _json(budget.epsilon(self.steps[client])),
            "delta": budget.delta,
            "noise_multiplier": budget.noise_multiplier,
            "sample_rate": budget.sample_rate,
            "private_steps": self.steps[client],
        }

    def server_fields(self) -> dict[str, Any]:
        """The privacy columns of the server row (client-level): the clients' epsilon so far."""
        if self.clients is None:
            return {}
        return {
            "epsilon": _json(self.clients.epsilon(self.rounds)),
            "delta": self.clients.delta,
            "noise_multiplier": self.clients.noise_multiplier,
            "sample_rate": self.clients.sample_rate,
            "noised_rounds": self.rounds,
        }

    def plan(self, sizes: Sequence[int]) -> str:
        """The run's privacy before it starts (``flora run --dry-run``): each client's noise,
        rate, delta, steps and the epsilon after the last round if it trains every round."""
        rounds = self.config.federation.rounds
        if self.clients is not None:
            c = self.clients
            return (
                f"client-level DP: noise multiplier {c.noise_multiplier:.4g} (std "
                f"{c.noise_multiplier * self.config.privacy.update_norm:.4g} / m on the "
                f"average), clients sampled at rate {c.sample_rate:.3g}, delta {c.delta:.3g}: "
                f"epsilon {c.epsilon(rounds):.3f} after {rounds} rounds"
            )
        if self.mode != "dp-sgd":
            return "privacy: none (privacy.mode = 'none')"
        lines = [
            "DP-SGD per client (epsilon after the last round, taking part in every round)",
            f"{'client':>6} {'examples':>9} {'noise':>8} {'rate':>7} {'delta':>9} "
            f"{'steps':>6} {'epsilon':>8}",
        ]
        for client, examples in enumerate(sizes):
            b = self.budget(client, examples)
            steps = b.steps_per_round * rounds
            lines.append(
                f"{client:>6} {examples:>9} {b.noise_multiplier:>8.4g} "
                f"{b.sample_rate:>7.3g} {b.delta:>9.3g} {steps:>6} "
                f"{b.epsilon(steps):>8.3f}"
            )
        return "\n".join(lines)

    def state(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "examples": list(self.examples), "rounds": self.rounds}

    def restore(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.steps = [int(v) for v in state["steps"]]
        self.examples = [None if v is None else int(v) for v in state["examples"]]
        self.rounds = int(state["rounds"])
