"""The server's side of the round loop: sample, configure, aggregate, record who completed.

Knows nothing of models or data: it holds adapters, the history of merged updates and which
round each client's base has reached, and runs the aggregator registry. The embedded simulator
and the Flower ServerApp both drive it, through the same three steps a round:

1. ``configure(round)`` computes each sampled client's task (what it downloads); it changes
   nothing, so a task that is never delivered costs nothing to forget;
2. ``aggregate(round, tasks, results)`` screens the uploads (flora.aggregation.screen: a bad or
   hostile one is rejected, or clipped, and named) and combines the accepted ones into the
   global state, if at least ``federation.min_clients`` remain;
3. ``complete(tasks, done, lost)`` advances the catch-up position of the clients that actually
   finished (their base now holds what their task sent), and resets the ones that lost theirs.

What a client starts from and trains, what the server keeps and how a result is applied are
the method's own (its :class:`~flora.aggregation.lifecycle.Lifecycle`): the server holds the
method's opaque state (checkpointed with the round) and the history of merged updates, asks the
method for each client's plan, and appends what the method merges to the history, which every
client catches up on before it trains.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flora.aggregation import AggregationReport, aggregate, get_method, measure
from flora.aggregation.lifecycle import State, check_parts
from flora.aggregation.screen import Screened, ScreenRules, Upload, screen
from flora.aggregation.validate import normalize_weights
from flora.config import RunConfig
from flora.errors import FloraError
from flora.factors import Adapter
from flora.privacy.client_level import noise_average, noise_generator, update_norm
from flora.privacy.ledger import Ledger
from flora.protocol import (
    ClientTask,
    RoundUpdate,
    catch_up,
    client_seed,
    sample_clients,
)

if TYPE_CHECKING:
    from flora.client import ClientResult

__all__ = ["RoundOutcome", "Server"]


@dataclass
class RoundOutcome:
    """One round's aggregation: the merged update (methods that merge) and its report."""

    round: int
    update: RoundUpdate | None
    report: AggregationReport
    seconds: float
    clipped: dict[int, float] = field(default_factory=dict)  # client -> norm clip factor
    fields: dict[str, float] = field(default_factory=dict)  # the method's own server-row fields
    norms: dict[int, float] = field(default_factory=dict)  # client -> its upload's norm, as sent
    # client -> its largest module norm over the others' median of that module (leave-one-out)
    ratios: dict[int, float] = field(default_factory=dict)

    def travels(self, server: Server) -> Adapter:
        """What goes down to the clients: the round's merged factors, or the method's LoRA."""
        if self.update is not None:
            return self.update.factors
        return server.adapter or {}


class Server:
    """Global state and the round protocol, for one run."""

    def __init__(
        self,
        config: RunConfig,
        shapes: dict[str, tuple[int, int]],
        sizes: Sequence[int] | None = None,
    ) -> None:
        """``sizes``: each client's partition size, where the server knows it (it bounds the
        example count an upload may claim)."""
        self.config = config
        self.shapes = dict(shapes)
        self.sizes = list(sizes) if sizes is not None else None
        screening = config.screening
        self.rules = ScreenRules(
            screening.max_update_norm,
            screening.norm_multiple,
            screening.norm_action,
            screening.max_examples,
            screening.rank_normalized,
        )
        self.method = get_method(config.federation.method)
        self.ranks = config.client_ranks()
        self.alphas = [config.lora.alpha_ratio * r for r in self.ranks]
        for k, rank in enumerate(self.ranks):
            for module, (out, inp) in sorted(shapes.items()):
                if rank > min(out, inp):
                    raise FloraError(
                        f"lora.ranks: client {k}'s rank {rank} exceeds min(out, in) = "
                        f"{min(out, inp)} of target layer '{module}' ({out}x{inp}); a LoRA "
                        f"cannot be wider than its layer: lower it to at most {min(out, inp)}"
                    )
        self.history: list[RoundUpdate] = []
        self.synced = [0] * len(self.ranks)  # rounds of merged updates each client's base holds
        self.shortfall: str | None = None  # why the last aggregate() failed its round
        self.lifecycle = self.method.lifecycle_for(config.federation.options)
        self.method_state: State = self.lifecycle.start(self.shapes, self.ranks, config.seed)
        # privacy: each client's spend; refuses an epsilon target that cannot be met
        self.ledger = Ledger(config, self.sizes, len(self.sample(1)))

    @property
    def adapter(self) -> Adapter | None:
        """The LoRA the global model applies over the merged base (the method's; None: none)."""
        return self.lifecycle.adapter(self.method_state)

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
        """Tasks for ``clients`` (default: this round's sample), with what each downloads.

        Pure: the server's state is unchanged until :meth:`complete` records who finished.
        """
        tasks = []
        for k in self.sample(round) if clients is None else clients:
            plan = self.lifecycle.plan(self.method_state, k, self.ranks[k], round)
            seed = client_seed(self.config.seed, round, k)
            trains = check_parts(plan.trains, f"{self.method.name}'s plan")
            task = ClientTask(
                k, round, self.ranks[k], self.alphas[k], seed, init=plan.init, trains=trains
            )
            task.fold = plan.fold and plan.init is not None
            task.folded = plan.folded
            task.core = plan.core
            task.since = self.synced[k]
            task.catch_up, missed = catch_up(
                self.history[self.synced[k] :], self.config.federation.catch_up
            )
            task.through = len(self.history)
            task.bytes_down = plan.bytes_down + missed
            tasks.append(task)
        return tasks

    def complete(
        self, tasks: Iterable[ClientTask], done: Iterable[int], lost: Iterable[int] = ()
    ) -> None:
        """Record the end of ``tasks``: clients in ``done`` now hold their task's base; clients
        in ``lost`` lost their stored base and get every merged update next time."""
        finished, gone = set(done), set(lost)
        for task in tasks:
            if task.client in finished:
                self.synced[task.client] = task.through
            elif task.client in gone:
                self.synced[task.client] = 0

    def screen(self, tasks: Sequence[ClientTask], results: Sequence[ClientResult]) -> Screened:
        """Screen the uploads of the clients that trained (flora.aggregation.screen); a rejected
        client's result gets the reason as its ``error`` (``rejected: ...``)."""
        if len(results) != len(tasks):
            raise FloraError(f"{len(results)} results for {len(tasks)} tasks; give one per task")
        uploads = []
        for task, r in zip(tasks, results, strict=True):  # one result per task, in order
            if not r.ok or r.factors is None:
                continue
            if r.client != task.client:
                r.error = f"rejected: the result for client {task.client} claims client {r.client}"
                r.client = task.client
                continue
            known = self.sizes[r.client] if self.sizes is not None else None
            uploads.append(
                Upload(
                    r.client, r.factors, float(r.examples), task.rank, known, task.init, task.frozen
                )
            )
        screened = screen(uploads, self.shapes, self.rules)
        if self.config.privacy.mode == "client-level":
            self._check_clipped(tasks, screened)
        for r in results:
            if r.client in screened.rejected:
                r.error = f"rejected: {screened.rejected[r.client]}"
        return screened

    def _check_clipped(self, tasks: Sequence[ClientTask], screened: Screened) -> None:
        """Client-level DP: reject an upload whose update exceeds privacy.update_norm (its
        client did not clip, and its noise would not cover it)."""
        bound = self.config.privacy.update_norm
        starts = {t.client: t for t in tasks}
        kept = []
        for upload in screened.accepted:
            task = starts[upload.client]
            assert task.init is not None  # client-level DP runs only with a global LoRA
            norm = update_norm(upload.factors, task.init, task.changes)
            if norm > bound * (1 + 1e-4):
                screened.rejected[upload.client] = (
                    f"its update's norm {norm:.4g} exceeds privacy.update_norm = {bound:g} "
                    "(not clipped on the client)"
                )
            else:
                kept.append(upload)
        screened.accepted = kept

    def aggregate(
        self, round: int, tasks: Sequence[ClientTask], results: Sequence[ClientResult]
    ) -> RoundOutcome | None:
        """Screen, then aggregate the accepted uploads. None, with the state unchanged, when
        fewer than ``federation.min_clients`` remain or the realised update is not finite
        (``self.shortfall`` says why): the round failed."""
        screened = self.screen(tasks, results)
        self.ledger.record(
            [
                (t.client, r.examples, r.steps)
                for t, r in zip(tasks, results, strict=True)
                if r.factors is not None
            ]
        )
        self.shortfall = None
        need = self.config.federation.min_clients
        if len(screened.accepted) < need:
            self.shortfall = (
                f"{len(screened.accepted)} usable upload(s) of "
                f"{len(tasks)} sampled; federation.min_clients = {need}"
            )
            return None
        start = time.perf_counter()
        factors = [u.factors for u in screened.accepted]
        options = self.config.federation.options
        examples = [u.examples for u in screened.accepted]
        private = self.ledger.clients is not None  # client-level DP: equal weights, then noise
        if private:
            examples = [1.0] * len(examples)
        clients = [u.client for u in screened.accepted]
        result = self.lifecycle.combine(
            self.method_state, round, clients, factors, normalize_weights(examples, len(clients))
        ) or aggregate(self.method.name, factors, examples, **options)
        result = dataclasses.replace(result, clients=clients)
        if not result.is_finite():
            self.shortfall = "the realised update is not finite (the accepted uploads overflow)"
            return None
        report = measure(factors, result.weights, result)
        if private:
            assert self.ledger.clients is not None
            privacy = self.config.privacy
            std = self.ledger.clients.noise_multiplier * privacy.update_norm / len(factors)
            generator = noise_generator(self.config.seed, round, privacy.reproducible_noise)
            trained = frozenset().union(*(t.changes for t in tasks))
            noised = noise_average(result.global_factors, std, generator, trained)
            result = dataclasses.replace(result, global_factors=noised)
            self.ledger.noised()
        starts = {t.client: t.init for t in tasks}
        accepted = [starts[u.client] for u in screened.accepted]
        step = self.lifecycle.advance(self.method_state, result, round, self.ranks, accepted)
        self.method_state = step.state
        update = None
        if step.merged is not None:
            update = RoundUpdate(round, step.merged, step.residual, step.wire)
            self.history.append(update)
        seconds = time.perf_counter() - start
        return RoundOutcome(
            round,
            update,
            report,
            seconds,
            screened.clipped,
            step.fields,
            screened.norms,
            screened.ratios,
        )

    def state(self) -> dict[str, Any]:
        """JSON-ready scalar state (tensors are checkpointed separately)."""
        return {
            "synced": list(self.synced),
            "history_rounds": [u.round for u in self.history],
            "privacy": self.ledger.state(),
        }

    def restore(self, state: dict[str, Any], history: list[RoundUpdate], method: State) -> None:
        """The state of a checkpoint: JSON scalars, the merged history and the method's state
        (every group :meth:`Lifecycle.start` made must be there)."""
        synced = state.get("synced")
        if not isinstance(synced, list) or len(synced) != len(self.synced):
            raise FloraError(
                f"the checkpoint's state.json has no 'synced' for {len(self.synced)} clients "
                "(damaged, or another run's); delete this round's checkpoint to resume from an "
                "earlier one"
            )
        self.synced = [int(v) for v in synced]
        self.ledger.restore(state.get("privacy"))
        self.history = history
        missing = sorted(set(self.method_state) - set(method))
        if missing:
            raise FloraError(
                f"the checkpoint lacks the method's state {missing} ({self.method.name}); resume "
                "from an earlier round, or start the run again"
            )
        self.method_state = {name: dict(group) for name, group in method.items()}
