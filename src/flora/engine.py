"""The run's core under both runtimes: the server, the server's copy of the model, the outputs,
and what happens at the start and the end of every round.

A runtime only moves tasks to clients and results back: the embedded simulator calls
:func:`flora.client.client_round` in a loop, the Flower ServerApp sends Messages. Both then call
``Server.complete`` and ``Server.aggregate`` and hand the round to :meth:`RunCore.end_round`,
which merges the update into the server's model, writes the rows, evaluates where the schedule
says and checkpoints, in that order, the same way for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.adapters import Adapter
from flora.checkpoint import Checkpoint, latest_round, load_checkpoint
from flora.client import ClientData, ClientResult, evaluate_model
from flora.config import RunConfig, config_fingerprint
from flora.data.federated import FederatedData, run_data
from flora.devices import resolve_device, resolve_precision
from flora.errors import FloraError
from flora.evaluation.during_run import mmlu_row
from flora.models import load_run_model, resolved_config, run_precision
from flora.outputs import RunOutputs, RunResult
from flora.protocol import ClientTask
from flora.server import RoundOutcome, Server
from flora.weights import applied, merge_update, target_shapes

__all__ = ["GlobalModel", "RunCore"]


class GlobalModel:
    """The server's copy of the base: W0 plus every merged update, in order. It evaluates the
    global model (with the global LoRA applied, for methods that keep one) and becomes
    final/model. The embedded runtime's clients train on this same model."""

    def __init__(self, config: RunConfig, device: str | None = None) -> None:
        self.config = config
        self.model: PreTrainedModel
        self.tokenizer: PreTrainedTokenizerBase
        self.model, self.tokenizer = load_run_model(config, device)
        self.precision = run_precision(config, self.model)
        self.shapes = target_shapes(self.model, config.model.target_modules)
        self.data: FederatedData = run_data(config, self.tokenizer)
        self.merged = 0  # rounds of the server's history merged into the weights

    def sync(self, server: Server) -> None:
        """Merge the server's updates this model does not hold yet: W += B A (+ R), in order."""
        for update in server.history[self.merged :]:
            merge_update(self.model, update)
        self.merged = len(server.history)

    def client_data(self, client: int) -> ClientData:
        data = self.data
        return ClientData(data.clients[client], data.heldout, data.heldout_records)

    def evaluate(
        self, lora: Adapter | None
    ) -> tuple[float, list[dict[str, str]], dict[str, float]]:
        """Held-out loss, sample answers and the loss per category of the global model."""
        heldout = ClientData([], self.data.heldout, self.data.heldout_records)
        return evaluate_model(self.model, self.tokenizer, heldout, self.config, lora)

    def mmlu(self, round: int, lora: Adapter | None) -> dict[str, Any]:
        """The ``mmlu`` metrics row of the global model after ``round`` (eval.mmlu)."""
        with applied(self.model, lora):
            return mmlu_row(self.model, self.tokenizer, self.config.eval, round, self.precision)


class RunCore:
    """One run's shared state and steps; a runtime drives it round by round."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        *,
        resume: bool,
        hint: str,
        device: str | None = None,
    ) -> None:
        """``device`` places the server's model (None: ``train.device``)."""
        config = resolved_config(config)  # targets and ranks written out, in config.json too
        self.config = config
        where = resolve_device(device or config.train.device, "train.device")
        recorded = {
            "device": str(where),
            "precision": resolve_precision(config.train.precision, where, config.model.dtype),
        }
        self.outputs = RunOutputs.open(run_dir, config, resume=resume, hint=hint,
                                       recorded=recorded)  # fmt: skip
        try:
            self.checkpoint: Checkpoint | None = None
            if resume and latest_round(run_dir) > 0:
                self.checkpoint = load_checkpoint(run_dir, config_fingerprint(config))
                if not self.outputs.metrics.path.is_file():
                    raise FloraError(
                        f"{self.outputs.metrics.path} is missing, and a resumed run needs the rows "
                        "of its rounds so far (its first held-out loss): restore the file, or "
                        "start the run again in a new --out"
                    )
            elif resume:  # it stopped before its first checkpoint: start it from the beginning
                self.outputs.truncate(-1)
            self.model = GlobalModel(config, device)
            sizes = [len(examples) for examples in self.model.data.clients]
            self.server = Server(config, self.model.shapes, sizes)
            self.first_round = 1
            if self.checkpoint is not None:
                cp = self.checkpoint
                self.server.restore(cp.state, cp.history, cp.global_lora)
                self.model.sync(self.server)  # W0 + each round's update, in order: bitwise
                self.outputs.truncate(cp.round)
                self.first_round = cp.round + 1
            else:  # the data row: what truncation kept, per category
                self.outputs.write(self.model.data.counts_row())
        except BaseException:
            self.outputs.close()
            raise

    @property
    def resumed(self) -> bool:
        return self.checkpoint is not None

    def evaluate(self, round: int) -> None:
        """The server's eval and mmlu rows after ``round``, where the schedule asks for them."""
        eval_config, last = self.config.eval, self.config.federation.rounds
        if eval_config.heldout_at(round, last):
            loss, samples, per_category = self.model.evaluate(self.server.global_lora)
            self.outputs.eval_row(round, loss, samples, per_category=per_category)
        if eval_config.mmlu_at(round, last):
            self.outputs.write(self.model.mmlu(round, self.server.global_lora))

    def end_round(
        self,
        round: int,
        tasks: Sequence[ClientTask],
        results: Sequence[ClientResult],
        outcome: RoundOutcome | None,
        extra: dict[str, Any],
        *,
        before_eval: Callable[[], None] | None = None,
        sketches: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Merge, write the client and server rows, evaluate where due, checkpoint.

        ``before_eval`` runs after the rows and before the server's evaluation:
        Flower's client-side evaluation goes there.
        """
        self.model.sync(self.server)
        self.outputs.round_rows(round, self.server, tasks, results, outcome, extra)
        if outcome is None:  # too few usable uploads: stop with the last checkpoint intact
            reasons = "; ".join(f"client {r.client}: {r.error}" for r in results if not r.ok)
            raise FloraError(
                f"round {round} failed: {self.server.shortfall} ({reasons or 'no replies'}); "
                f"the run stopped with round {round - 1}'s state intact in {self.outputs.run_dir}: "
                "fix the cause (or lower federation.min_clients) and resume it"
            )
        if before_eval is not None:
            before_eval()
        self.evaluate(round)
        update = outcome.update if outcome is not None else None
        self.outputs.checkpoint(round, self.server, update, sketches)

    def close(self) -> None:
        """Release the run directory (its lock); a runtime calls it however the run ends."""
        self.outputs.close()

    def finish(self, seconds: float, runtime: str) -> RunResult:
        """final/model, final/adapter and summary.json."""
        return self.outputs.finish(
            self.model.model,
            self.model.tokenizer,
            self.server.global_lora,
            self.server.history,
            seconds,
            runtime,
        )
