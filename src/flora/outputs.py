"""What a run writes, for both runtimes: config.json, metrics.jsonl rows, per-round checkpoints,
final/model and final/adapter, and summary.json.

The rows (one JSON object a line):
- ``client``: one per client and round: rank, examples, tokens, steps, train loss and its
  per-step curve (``loss_curve``), seconds, peak memory while training (``peak_rss_mib``,
  ``peak_cuda_mib``), bytes up and down, catch-up rounds, and the runtime's own timings
  (Flower: message timestamps);
- ``server``: one per round: the clients aggregated and those that failed (with their errors),
  aggregation noise, global rank, bytes, seconds;
- ``eval``: the global model's held-out loss and sample answers, at the rounds
  ``EvalConfig.heldout_at`` names (the last one marked ``final``; ``client`` where a node
  measured it);
- ``mmlu``: k-shot MMLU of the global model at the rounds ``EvalConfig.mmlu_at`` names.
Every row goes to metrics.jsonl first, then to the trackers ``output.report_to`` names
(flora.sinks: TensorBoard, W&B, MLflow).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import socket
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.adapters import save_peft_adapter
from flora.aggregation.base import adapter_bytes
from flora.checkpoint import latest_round, save_checkpoint
from flora.client import ClientResult
from flora.config import RECORDED, RunConfig, config_fingerprint, config_to_dict
from flora.errors import FloraError
from flora.export import cumulative_adapter
from flora.factors import Adapter
from flora.io import atomic_write_json, atomic_write_text
from flora.metrics import read_metrics
from flora.model_card import model_card
from flora.models import base_reference, load_model
from flora.protocol import ClientTask, RoundUpdate
from flora.server import RoundOutcome, Server
from flora.sinks import check_trackers
from flora.sinks.fanout import MetricSinks
from flora.weights import applied, fan_in_fan_out

__all__ = [
    "RunOutputs",
    "RunResult",
    "finished",
    "save_final",
]

_TIMING = {  # ClientResult.timing keys -> client row fields (Flower: see flora.flower.records)
    "process-age": "process_age",
    "prepare-seconds": "prepare_seconds",
    "received-at": "received_at",
    "replied-at": "replied_at",
}


@dataclass
class RunResult:
    run_dir: Path
    loss_before: float
    loss_after: float
    samples: list[dict[str, Any]]  # before/after answers, the most changed first
    seconds: float


def finished(run_dir: Path, rounds: int) -> bool:
    """Whether ``run_dir`` holds a run that completed all ``rounds`` (summary written)."""
    return (run_dir / "summary.json").is_file() and latest_round(run_dir) >= rounds


def library_versions() -> dict[str, str]:
    """The versions a run's results depend on (config.json's ``recorded.versions``)."""
    import importlib.metadata
    import platform

    versions = {"python": platform.python_version()}
    for name in ("flora-lora", "torch", "transformers", "peft", "safetensors", "flwr"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def answer_change(before: str, after: str) -> float:
    """How much an answer changed: 1 - difflib's similarity ratio of the two texts (0: the
    same text, 1: nothing in common)."""
    import difflib

    return round(1.0 - difflib.SequenceMatcher(None, before, after).ratio(), 4)


class RunOutputs:
    """The files of one run directory, written the same way by every runtime."""

    def __init__(self, run_dir: Path, config: RunConfig, lock: IO[str] | None = None) -> None:
        self.run_dir = run_dir
        self.config = config
        # metrics.jsonl, then the trackers of output.report_to (flora.sinks), for every row
        self.metrics = MetricSinks(run_dir, config.output.report_to, config_to_dict(config))
        self._lock = lock

    @classmethod
    def open(
        cls,
        run_dir: Path,
        config: RunConfig,
        *,
        resume: bool,
        hint: str,
        recorded: dict[str, Any] | None = None,
    ) -> RunOutputs:
        """A new run's directory (config.json written; an existing run is never overwritten),
        or, with ``resume``, the existing one, locked for this process until :meth:`close`.
        ``hint`` says how to resume or pick another. config.json's ``recorded`` block holds
        ``recorded`` (what the settings resolved to here) and the library versions; it is a
        record, not a setting (a resume reads the settings only)."""
        check_trackers(config.output.report_to)  # before anything is written
        if run_dir.exists() and not run_dir.is_dir():
            raise FloraError(f"{run_dir} is a file, not a run directory; pick another --out")
        if resume and not (run_dir / "config.json").is_file():
            raise FloraError(
                f"{run_dir} holds no run to resume (no config.json); start one "
                "with a CONFIG instead"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(run_dir)
        try:
            if not resume and (run_dir / "metrics.jsonl").exists():
                raise FloraError(f"{run_dir} already holds a run; {hint}")
            saved = run_dir / "config.json"
            settings = config_to_dict(config)
            record = {**(recorded or {}), "versions": library_versions()}
            if not resume:
                atomic_write_json(saved, {**settings, RECORDED: record})
            else:
                before = json.loads(saved.read_text(encoding="utf-8"))
                before.pop(RECORDED, None)
                if before != settings:  # extended: more rounds
                    atomic_write_json(saved, {**settings, RECORDED: record})
        except BaseException:
            lock.close()
            raise
        return cls(run_dir, config, lock)

    def close(self) -> None:
        """Close the metric sinks and release the run directory's lock (the process's exit
        releases it too)."""
        self.metrics.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # --- rows -----------------------------------------------------------------------------
    def round_rows(
        self,
        round: int,
        server: Server,
        tasks: Sequence[ClientTask],
        results: Sequence[ClientResult],
        outcome: RoundOutcome | None,
        extra: dict[str, Any],
    ) -> None:
        """The client rows of the clients that trained, then the round's server row."""
        done = [(t, r) for t, r in zip(tasks, results, strict=True) if r.ok]
        if outcome is not None:
            bytes_up = outcome.report.bytes_up
        else:  # a failed round: what they sent, though nothing was aggregated
            bytes_up = [adapter_bytes(r.factors) if r.factors else 0 for _, r in done]
        norms = outcome.norms if outcome is not None else {}
        median = statistics.median(norms.values()) if norms else 0.0
        for (task, result), up in zip(done, bytes_up, strict=True):
            client_row = _client_row(task, result, up) | server.ledger.client_fields(task.client)
            if task.client in norms:  # its upload's ||s B A||_F, and against the round's median
                norm = norms[task.client]
                ratio = norm / median if median else None
                client_row |= {"update_norm": norm, "norm_ratio": ratio}
            if outcome is not None and task.client in outcome.ratios:
                # what screening.norm_multiple compares: its largest module against the others
                client_row["module_norm_ratio"] = outcome.ratios[task.client]
            self.metrics.write(client_row)
        failed = {r.client: r.error or "no upload" for r in results if not r.ok}
        for client, reason in sorted(failed.items()):  # one row per left-out client
            stage = "screening" if reason.startswith("rejected: ") else "client"
            self.metrics.write(
                {
                    "kind": "fault",
                    "round": round,
                    "client": client,
                    "stage": stage,
                    "reason": reason,
                }
            )
        row: dict[str, Any] = {
            "kind": "server",
            "round": round,
            "method": server.method.name,
            "clients": [t.client for t, _ in done],
            "failed": sorted(failed),
            "errors": {str(k): v for k, v in sorted(failed.items())},
        }
        if outcome is None:
            row["round_failed"] = server.shortfall
        else:
            row |= {
                "clipped": {str(k): v for k, v in sorted(outcome.clipped.items())},
                **outcome.fields,
                "noise": outcome.report.noise,
                "global_rank": max(outcome.report.global_ranks.values()),
                "bytes_up": sum(outcome.report.bytes_up),
                "bytes_down": sum(t.bytes_down for t, _ in done),
                "aggregate_seconds": outcome.seconds,
                "train_seconds": sum(r.seconds for _, r in done),
            }
        row |= server.ledger.server_fields()
        self.metrics.write(row | extra)

    def eval_row(
        self,
        round: int,
        loss: float,
        samples: list[dict[str, str]],
        client: int | None = None,
        per_category: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """An ``eval`` row of the global model: the server's own, or ``client``'s."""
        row: dict[str, Any] = {
            "kind": "eval",
            "round": round,
            "heldout_loss": loss,
            "perplexity": math.exp(loss),
            "samples": samples,
        }
        if per_category:
            row["per_category"] = dict(sorted(per_category.items()))
        if client is not None:
            row["client"] = client
        if round == self.config.federation.rounds:
            row["final"] = True
        self.metrics.write(row)
        return row

    def write(self, row: dict[str, Any]) -> None:
        self.metrics.write(row)

    # --- checkpoints ----------------------------------------------------------------------
    def checkpoint(
        self,
        round: int,
        server: Server,
        update: RoundUpdate | None,
        sketches: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Round ``round``'s checkpoint: the last step of a round, after its rows."""
        return save_checkpoint(
            self.run_dir,
            round,
            server.state(),
            update,
            server.method_state,
            sketches or {},
            config_fingerprint(self.config),
        )

    def truncate(self, round: int) -> None:
        """Drop the rows after ``round`` (a resumed run writes them again; -1: every row)."""
        self.metrics.truncate(round, final_round=self.config.federation.rounds)

    # --- the end --------------------------------------------------------------------------
    def server_evals(self) -> dict[int, dict[str, Any]]:
        """The server's own eval rows by round (client-measured ones left out)."""
        return {
            int(r["round"]): r
            for r in read_metrics(self.metrics.path)
            if r.get("kind") == "eval" and "client" not in r
        }

    def finish(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        lora: Adapter | None,
        history: Sequence[RoundUpdate],
        seconds: float,
        runtime: str,
    ) -> RunResult:
        """final/adapter, final/model and summary.json from the run's first and last eval."""
        save_final(self.run_dir / "final", model, tokenizer, self.config, lora, history)
        evals, rounds = self.server_evals(), self.config.federation.rounds
        if 0 not in evals or rounds not in evals:
            raise FloraError(f"the held-out evaluation before or after failed; see {self.run_dir}")
        before, after = evals[0], evals[rounds]
        samples = [
            {
                "instruction": b["instruction"],
                "before": b["answer"],
                "after": a["answer"],
                "change": answer_change(b["answer"], a["answer"]),
            }
            for b, a in zip(before.get("samples", []), after.get("samples", []), strict=False)
        ]
        samples.sort(key=lambda sample: -float(sample["change"]))  # most changed first
        result = RunResult(
            self.run_dir, before["heldout_loss"], after["heldout_loss"], samples, seconds
        )
        summary = dataclasses.asdict(result) | {
            "run_dir": str(self.run_dir),
            "runtime": runtime,
            "versions": package_versions(),
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        adapter = self.run_dir / "final" / "adapter"
        if (adapter / "adapter_config.json").is_file():
            rows = read_metrics(self.metrics.path)
            base = base_reference(self.config.model.name)
            card = model_card(self.config, base, rows, summary["versions"])
            atomic_write_text(adapter / "README.md", card)
        return result


RECORDED_PACKAGES = (
    "flora-lora",  # the distribution's name ("flora" is another project's on PyPI)
    "torch",
    "transformers",
    "peft",
    "gguf",
    "accelerate",
    "datasets",
    "flwr",
    "opacus",
    "bitsandbytes",
)


def package_versions() -> dict[str, str | None]:
    """The installed versions of the packages a run's numbers depend on (None: not installed).

    A run's losses move with them: the same config and seed gave SmolLM2's held-out loss 2.54390
    on one install and 2.54452 on a later one (docs/results.md), so every summary says which."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _lock(run_dir: Path) -> IO[str]:
    """An exclusive lock on ``run_dir/.lock``, held while the returned file is open; a second
    process on the same run directory is refused at once."""
    handle = open(run_dir / ".lock", "a+", encoding="utf-8")  # noqa: SIM115  # held open
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FloraError(
            f"{run_dir} is in use by {holder}: one run or resume at a time per run directory; "
            "wait for it to end, or use another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"flora pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def _client_row(task: ClientTask, result: ClientResult, bytes_up: int) -> dict[str, Any]:
    row = {
        "kind": "client",
        "round": task.round,
        "client": task.client,
        "rank": task.rank,
        "train_loss": result.train_loss,
        "examples": result.examples,
        "tokens": result.tokens,
        "steps": result.steps,
        "seconds": result.seconds,
        "bytes_up": bytes_up,
        "bytes_down": task.bytes_down,
        "catch_up_rounds": len(task.catch_up),
        "peak_rss_mib": result.peak_rss_mib,  # while training (Linux; the process's resident set)
        "peak_cuda_mib": result.peak_cuda_mib,  # while training, on CUDA
        "loss_curve": result.loss_curve,  # per local step: the sinks draw it per client
    }
    # Flower: the age of the process that ran the message (a ClientApp, or the node's worker)
    # when it arrived, the time from then until training started (imports, model, base restore
    # and catch-up, data), and when the node started and finished it (Unix time, its clock)
    row |= {name: result.timing[key] for key, name in _TIMING.items() if key in result.timing}
    return row


def save_final(
    final: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: RunConfig,
    lora: Adapter | None,
    history: Sequence[RoundUpdate] = (),
) -> None:
    """``final/adapter``: the run's whole update (``history``'s merged rounds and ``lora``) as
    one PEFT LoRA over the original base (flora.export); ``final/model`` (``output.model``): the
    base with that update merged; ``final/base``: a random tiny model's base, which has no
    checkpoint elsewhere for the adapter to name."""
    if config.output.model:
        with applied(model, lora):
            model.save_pretrained(final / "model")
            tokenizer.save_pretrained(final / "model")
    adapter = cumulative_adapter(history, lora)
    if adapter is None:
        return
    base = base_reference(config.model.name)
    if base is None:  # a random tiny base travels with the run, named relative to the adapter
        base_model, base_tokenizer = load_model(config.model.name, seed=config.seed)
        base_model.save_pretrained(final / "base")
        base_tokenizer.save_pretrained(final / "base")
        base = "../base"
    template = {
        "base_model_name_or_path": base,
        "target_modules": config.model.target_modules,
        "fan_in_fan_out": fan_in_fan_out(model, config.model.target_modules),
    }
    save_peft_adapter(final / "adapter", adapter, template=template)
    tokenizer.save_pretrained(final / "adapter")
