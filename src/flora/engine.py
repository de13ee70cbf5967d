"""The run's core under every runtime: the server, the server's copy of the model, the outputs,
and the one round loop.

Every round is configure -> execute -> complete -> aggregate -> end of round
(:meth:`RunCore.play_round`). A runtime (:class:`Runtime`) supplies only ``execute``: how a
list of tasks becomes a list of results (the embedded simulator: a loop over
:func:`flora.client.client_round`; Flower: Messages to the nodes and their replies), plus
optional hooks (client-side evaluation, its own server-row fields). :meth:`RunCore.end_round`
then merges the update into the server's model, writes the rows, evaluates where the schedule
says and checkpoints, in that order, the same way for all. :func:`drive` runs a whole run on a
runtime; ``flora.runtimes`` names them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.checkpoint import Checkpoint, latest_round, load_checkpoint
from flora.client import ClientData, ClientResult, evaluate_model
from flora.config import RunConfig, config_fingerprint
from flora.data.federated import FederatedData, run_data
from flora.devices import (
    resolve_attention,
    resolve_base_dtype,
    resolve_device,
    resolve_precision,
)
from flora.errors import FloraError
from flora.evaluation.during_run import mmlu_row
from flora.factors import Adapter
from flora.models import load_run_model, resolved_config, run_precision
from flora.node_state import RESYNC
from flora.outputs import RunOutputs, RunResult
from flora.protocol import ClientTask
from flora.server import RoundOutcome, Server
from flora.weights import applied, merge_update, target_shapes

__all__ = ["GlobalModel", "RunCore", "Runtime", "drive"]


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


class Runtime:
    """How a run's tasks reach clients and their results come back; subclass and define
    :meth:`execute`. The other hooks are optional."""

    name = "runtime"  # summary.json's ``runtime``

    def execute(self, round: int, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        """One result per task, in order: the client's, or one whose ``error`` says why not
        (an error containing ``flora-resync`` means the client lost its stored base)."""
        raise NotImplementedError

    def evaluate(self, round: int) -> None:
        """Client-side evaluation of the global model after ``round`` (0: before training),
        before the server's own; it writes its row through ``RunCore.outputs``."""

    def fields(self, round: int, results: Sequence[ClientResult], seconds: float) -> dict[str, Any]:
        """The runtime's own fields of the round's server row (``seconds``: the round so far)."""
        return {}

    def sketches(self) -> dict[int, dict[str, torch.Tensor]] | None:
        """Per-client base sketches to checkpoint (the embedded runtime's catch-up record)."""
        return None

    def close(self) -> None:
        """Release what the runtime holds (progress bars, pools); called however the run ends."""


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
        precision = resolve_precision(config.train.precision, where, config.model.dtype)
        base = resolve_base_dtype(config.model.dtype, where, config.train.precision)
        recorded = {
            "device": str(where),
            "precision": precision,
            "base_dtype": base,
            "attention": resolve_attention(config.model.attention, where, base),
            "tf32": config.train.tf32 and where.type == "cuda",
        }
        self.outputs = RunOutputs.open(run_dir, config, resume=resume, hint=hint, recorded=recorded)
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
                self.server.restore(cp.state, cp.history, cp.method_state)
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
            loss, samples, per_category = self.model.evaluate(self.server.adapter)
            self.outputs.eval_row(round, loss, samples, per_category=per_category)
        if eval_config.mmlu_at(round, last):
            self.outputs.write(self.model.mmlu(round, self.server.adapter))

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
        for result in results:  # what the screen left out or bounded, one line each
            if result.error is not None and result.error.startswith("rejected: "):
                reason = result.error.removeprefix("rejected: ")
                print(
                    f"flora: round {round}, client {result.client} left out: {reason}",
                    file=sys.stderr,
                )
        for client, scale in sorted((outcome.clipped if outcome else {}).items()):
            print(
                f"flora: round {round}, client {client}'s update clipped by {scale:.3g}",
                file=sys.stderr,
            )
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

    def play(self, runtime: Runtime) -> None:
        """The evaluation before training (a new run), then every round left, on ``runtime``."""
        if not self.resumed:
            runtime.evaluate(0)
            self.evaluate(0)
        for t in range(self.first_round, self.config.federation.rounds + 1):
            self.play_round(t, runtime)

    def play_round(self, round: int, runtime: Runtime) -> None:
        """configure -> execute -> complete -> aggregate -> end of round."""
        start = time.perf_counter()
        tasks = self.server.configure(round)
        results = runtime.execute(round, tasks)
        if len(results) != len(tasks):  # a result claiming another client is the screen's
            raise FloraError(
                f"runtime {runtime.name} returned {len(results)} results for {len(tasks)} tasks; "
                "return one per task, in order"
            )
        done = [r.client for r in results if r.error is None]
        lost = [r.client for r in results if r.error is not None and RESYNC in r.error]
        self.server.complete(tasks, done=done, lost=lost)
        outcome = self.server.aggregate(round, tasks, results)
        seconds = time.perf_counter() - start
        extra = {"round_seconds": seconds, **runtime.fields(round, results, seconds)}
        self.end_round(
            round,
            tasks,
            results,
            outcome,
            extra,
            before_eval=lambda: runtime.evaluate(round),
            sketches=runtime.sketches(),
        )

    def close(self) -> None:
        """Release the run directory (its lock); a runtime calls it however the run ends."""
        self.outputs.close()

    def finish(self, seconds: float, runtime: str) -> RunResult:
        """final/model, final/adapter and summary.json."""
        return self.outputs.finish(
            self.model.model,
            self.model.tokenizer,
            self.server.adapter,
            self.server.history,
            seconds,
            runtime,
        )


def drive(
    config: RunConfig,
    run_dir: Path,
    runtime: Callable[[RunCore, bool], Runtime],
    *,
    resume: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Run (or resume) a whole run in ``run_dir`` on the runtime ``runtime(core, quiet)``
    builds: the clients' data table, every round, then final/ and summary.json."""
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    hint = f"use --resume {run_dir} or another --out"
    core = RunCore(config, run_dir, resume=resume, hint=hint)
    try:
        say = (lambda *_: None) if quiet else print
        if core.resumed:
            say(f"resuming {run_dir} after round {core.first_round - 1}")
        else:
            say(core.model.data.table)
        driver = runtime(core, quiet)
        try:
            core.play(driver)
        finally:
            driver.close()
        return core.finish(time.perf_counter() - start, driver.name)
    finally:
        core.close()
