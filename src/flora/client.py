"""One client's round, as both runtimes run it: catch up, train, extract, evaluate, report.

The embedded simulator calls :func:`client_round` for each sampled client on its one shared
model; a Flower node (ClientApp or warm worker) calls it on its own copy of the base. The base
says how it catches up (:class:`Base`): a node merges the missed updates into its weights, the
embedded runtime's shared model already holds them and only tracks each client's position.
Whatever goes wrong in the round is caught and returned in ``ClientResult.error``: one client's
failure is the driver's to report, never a crash of the federation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.aggregation.registry import get_method
from flora.config import RunConfig
from flora.data.prompts import Example
from flora.errors import FloraError
from flora.factors import Adapter
from flora.generation import generate_answer
from flora.models import run_precision
from flora.privacy.accounting import dp_sgd_plan
from flora.privacy.client_level import clip_update
from flora.protocol import ClientTask
from flora.training import category_losses, train_client
from flora.weights import applied

__all__ = ["Base", "ClientData", "ClientResult", "client_round", "evaluate_model"]


class Base(Protocol):
    """The model a client trains on, and how it reaches the server's base for a task."""

    @property
    def model(self) -> PreTrainedModel: ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    def catch_up(self, task: ClientTask) -> None:
        """Make the weights (or their record) hold what ``task`` says the server's base holds."""


@dataclass
class ClientData:
    """One client's share of the run's data (flora.data.federated.run_data splits it)."""

    examples: list[Example]  # its training examples
    heldout: list[Example]  # the run's held-out set (the same on every client)
    heldout_records: Sequence[Mapping[str, Any]]  # their raw rows, for generation samples


@dataclass
class ClientResult:
    """Everything one client's round returns: what it uploads and what it reports."""

    client: int
    round: int
    factors: Adapter | None = None  # trained factors at the client's scaling (None: no training)
    examples: int = 0  # examples the client holds (its aggregation weight)
    tokens: int = 0  # non-pad tokens it trained on
    steps: int = 0
    train_loss: float = math.nan
    loss_curve: list[float] = field(default_factory=list)  # each local step's loss, in order
    seconds: float = 0.0  # in training
    sync_seconds: float = 0.0  # bringing the base up to date
    peak_rss_mib: float | None = None  # highest resident set size while training (Linux)
    peak_cuda_mib: float | None = None  # peak allocated CUDA memory while training
    heldout_loss: float | None = None  # with evaluate: the global model's held-out loss
    samples: list[dict[str, str]] = field(default_factory=list)  # ... and its sample answers
    timing: dict[str, float] = field(default_factory=dict)  # the runtime's own timestamps
    error: str | None = None  # what went wrong; the driver leaves this client out

    @property
    def ok(self) -> bool:
        """Trained and nothing failed: the upload can be aggregated."""
        return self.error is None and self.factors is not None


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: ClientData,
    config: RunConfig,
    lora: Adapter | None,
) -> tuple[float, list[dict[str, str]], dict[str, float]]:
    """Held-out loss, sample answers and the loss per category of ``model`` with ``lora``
    applied (restored after)."""
    precision = run_precision(config, model)
    with applied(model, lora):
        loss, losses = category_losses(
            model,
            data.heldout,
            batch_size=config.eval.batch_size,
            pad_id=int(tokenizer.pad_token_id),
            precision=precision,
        )
        samples = [
            {
                "instruction": str(record["instruction"]),
                "answer": generate_answer(
                    model,
                    tokenizer,
                    record["instruction"],
                    record.get("context", ""),
                    template=config.data.template,  # type: ignore[arg-type]
                    max_new_tokens=config.eval.max_new_tokens,
                    precision=precision,
                    no_repeat_ngram_size=config.eval.no_repeat_ngram_size,
                ),
            }
            for record in data.heldout_records[: config.eval.samples]
        ]
    return loss, samples, {k: v[0] for k, v in losses.items()}


def client_round(
    base: Base,
    data: ClientData,
    task: ClientTask,
    config: RunConfig,
    *,
    train: bool = True,
    evaluate: bool = False,
    lora: Adapter | None = None,
) -> ClientResult:
    """One client's round: catch up, then train (``train``) and/or evaluate the global model
    (``evaluate``: the synced base with ``lora`` applied). Errors come back in the result."""
    result = ClientResult(task.client, task.round)
    try:
        start = time.perf_counter()
        base.catch_up(task)
        result.sync_seconds = time.perf_counter() - start
        if train:
            fed = config.federation
            lifecycle = get_method(fed.method).lifecycle_for(fed.options)
            precision = run_precision(config, base.model)
            local = train_client(
                base.model,
                data.examples,
                rank=task.rank,
                alpha=task.alpha,
                target_modules=config.model.target_modules,
                config=dataclasses.replace(config.train, precision=precision),
                seed=task.seed,
                pad_id=int(base.tokenizer.pad_token_id),
                init=lifecycle.start_factors(task.init, task.rank),
                trains=task.trains,
                fold_init=task.fold,
                folded=task.folded,
                core=task.core,
                use_rslora=config.lora.use_rslora,
                privacy=dp_sgd_plan(config, len(data.examples), task.client),
            )
            factors = lifecycle.upload(local.factors, task.init)
            if config.privacy.mode == "client-level":  # clipped here: the server never sees more
                if task.init is None:
                    raise FloraError("privacy.mode = 'client-level' needs a global LoRA task")
                bound = config.privacy.update_norm
                factors, _ = clip_update(factors, task.init, bound, task.changes)
            result.factors, result.examples, result.tokens = (
                factors,
                local.examples,
                local.tokens,
            )
            result.steps, result.train_loss, result.seconds = (
                local.steps,
                local.train_loss,
                local.seconds,
            )
            result.peak_rss_mib, result.peak_cuda_mib = local.peak_rss_mib, local.peak_cuda_mib
            result.loss_curve = list(local.loss_curve)
        if evaluate:
            result.heldout_loss, result.samples, _ = evaluate_model(
                base.model, base.tokenizer, data, config, lora
            )
    except Exception as error:  # one client's failure is reported, never raised
        result.error = f"{type(error).__name__}: {error}"
    return result
