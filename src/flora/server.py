"""The server's side of the round loop: sample, configure, aggregate, and keep the global state.

Knows nothing of models or data: it holds adapters, the history of merged updates and which
round each client's base has reached, and runs the aggregator registry. The embedded simulator
and the Flower ServerApp both drive it.

How a result is applied follows each method's paper:
- flora, florist, fedex-lora merge the realised update into the base weights; clients start fresh
  LoRAs of their own rank every round (FLoRA's protocol), after catching up on missed updates.
- fedit, zero-padding, flexlora, ffa-lora keep a global LoRA that clients continue from (its
  truncation to r_k for zero-padding and flexlora; A frozen and shared for ffa-lora).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flora.adapters import Adapter
from flora.aggregation import AggregationReport, aggregate, get_method, measure
from flora.aggregation.base import adapter_bytes
from flora.aggregation.validate import normalize_weights
from flora.aggregation.zero_padding import truncate
from flora.config import RunConfig
from flora.protocol import RoundUpdate, catch_up, initial_lora, sample_clients

__all__ = ["ClientTask", "Server", "client_seed"]


def client_seed(seed: int, round: int, client: int) -> int:
    """The seed of one client's local round: distinct per (run, round, client), stable on resume."""
    return (seed * 1_000_003 + round * 10_007 + client) % (2**31 - 1)


@dataclass
class ClientTask:
    """What the server sends one sampled client for one round."""

    client: int
    round: int
    rank: int
    alpha: float
    seed: int
    init: Adapter | None = None  # starting factors (scaling 1), for methods with a global LoRA
    freeze_A: bool = False  # ffa-lora
    catch_up: list[RoundUpdate] = field(default_factory=list)  # merged updates it missed
    bytes_down: int = 0


class Server:
    """Global state and the round protocol, for one run."""

    def __init__(self, config: RunConfig, shapes: dict[str, tuple[int, int]]) -> None:
        self.config = config
        self.method = get_method(config.federation.method)
        self.ranks = config.client_ranks()
        self.alphas = [config.lora.alpha_ratio * r for r in self.ranks]
        self.history: list[RoundUpdate] = []
        self.synced = [0] * len(self.ranks)  # rounds of merged updates each client's base holds
        self.global_lora: Adapter | None = None
        if self.method.keeps_global_lora:
            self.global_lora = initial_lora(shapes, max(self.ranks), config.seed)

    @property
    def num_clients(self) -> int:
        return len(self.ranks)

    def sample(self, round: int) -> list[int]:
        fed = self.config.federation
        if fed.centralized:
            return [0]
        return sample_clients(
            self.num_clients, fed.fraction, fed.min_clients, self.config.seed, round
        )

    def configure(self, round: int, clients: Sequence[int] | None = None) -> list[ClientTask]:
        """Tasks for ``clients`` (default: this round's sample), with what each downloads."""
        tasks = []
        for k in self.sample(round) if clients is None else clients:
            task = ClientTask(
                k, round, self.ranks[k], self.alphas[k], client_seed(self.config.seed, round, k)
            )
            if self.global_lora is not None:
                task.init = {m: truncate(f, task.rank) for m, f in self.global_lora.items()}
                task.freeze_A = self.method.name == "ffa-lora"
                task.bytes_down = adapter_bytes(task.init, parts="B" if task.freeze_A else "AB")
            else:
                task.catch_up, task.bytes_down = catch_up(
                    self.history[self.synced[k] :], self.config.federation.catch_up
                )
                self.synced[k] = len(self.history)
            tasks.append(task)
        return tasks

    def aggregate(
        self,
        round: int,
        tasks: Sequence[ClientTask],
        updates: Sequence[Adapter],
        examples: Sequence[int],
    ) -> tuple[RoundUpdate | None, AggregationReport]:
        """Aggregate the uploads; returns the update to merge into the base (None if none)."""
        weights = normalize_weights([float(n) for n in examples], len(updates))
        options = self.config.federation.method_options()
        result = aggregate(self.method.name, list(updates), weights, **options)
        report = measure(list(updates), weights, result)
        if self.global_lora is not None:
            # Keep the global LoRA at the largest rank of ALL clients: a round's participants may
            # all be small, and a larger client joining later must get its full rank (zero-padded).
            width = max(self.ranks)
            self.global_lora = {m: truncate(f, width) for m, f in result.global_factors.items()}
            return None, report
        update = RoundUpdate(round, result.global_factors, result.residual)
        self.history.append(update)
        return update, report

    def state(self) -> dict[str, Any]:
        """JSON-ready scalar state (tensors are checkpointed separately)."""
        return {"synced": list(self.synced), "history_rounds": [u.round for u in self.history]}

    def restore(
        self, state: dict[str, Any], history: list[RoundUpdate], lora: Adapter | None
    ) -> None:
        self.synced = [int(v) for v in state["synced"]]
        self.history = history
        if self.method.keeps_global_lora:
            self.global_lora = lora
