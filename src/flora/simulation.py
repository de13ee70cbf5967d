"""The embedded runtime: K clients simulated in one process over ONE shared base model.

Each sampled client injects its LoRA into the shared model, trains, hands back its factors and
removes the LoRA (flora.training), so peak memory does not grow with K. The server (flora.server)
aggregates with the registry; merged updates are added into the shared weights. Every round ends
with metrics rows and an atomic checkpoint; ``resume`` replays the merged history onto the
freshly built base and continues, bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.adapters import Adapter, save_peft_adapter
from flora.checkpoint import load_checkpoint, save_checkpoint
from flora.config import RunConfig, config_from_dict, config_to_dict
from flora.data.federated import FederatedData, prepare_data
from flora.errors import FloraError
from flora.generation import generate_answer
from flora.io import atomic_write_json
from flora.metrics import MetricsLog, read_metrics
from flora.models import load_model, resolve_precision
from flora.protocol import RoundUpdate, apply_to_sketch, sketch_drift, sketch_probes
from flora.server import Server
from flora.training import evaluate_loss, merge_into_base, train_client

__all__ = ["RunResult", "run", "run_data", "save_final", "target_shapes"]


@dataclass
class RunResult:
    run_dir: Path
    loss_before: float
    loss_after: float
    samples: list[dict[str, str]]
    seconds: float


def target_shapes(model: torch.nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer whose leaf name is a target module."""
    shapes = {
        name: (int(m.weight.shape[0]), int(m.weight.shape[1]))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    if not shapes:
        raise FloraError(f"model.target_modules {targets} match no linear layer of the model")
    return shapes


def run_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> FederatedData:
    """The run's data from its config: seeded end to end, so every runtime gets the same split."""
    fed = config.federation
    return prepare_data(
        source=config.data.source,
        tokenizer=tokenizer,
        template=config.data.template,
        max_length=config.data.max_length,
        limit=config.data.limit,
        heldout=config.data.heldout,
        scheme=config.data.partition,
        num_clients=1 if fed.centralized else fed.num_clients,
        seed=config.seed,
        label_column=config.data.label_column,
        dirichlet_alpha=config.data.dirichlet_alpha,
        shards_per_client=config.data.shards_per_client,
    )


def _weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    weight = model.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _deltas(update: RoundUpdate) -> dict[str, torch.Tensor]:
    out = {m: f.delta() for m, f in update.factors.items()}
    for module, residual in (update.residual or {}).items():
        out[module] = out[module] + residual
    return out


@contextlib.contextmanager
def applied(model: PreTrainedModel, lora: Adapter | None) -> Iterator[None]:
    """The base with ``lora`` merged in, restored bitwise afterwards (to evaluate a global LoRA)."""
    if lora is None:
        yield
        return
    saved = {m: _weight(model, m).detach().clone() for m in lora}
    merge_into_base(model, {m: f.delta() for m, f in lora.items()})
    try:
        yield
    finally:
        with torch.no_grad():
            for module, weight in saved.items():
                _weight(model, module).copy_(weight)


def _server_sketch(
    model: PreTrainedModel, probes: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {m: _weight(model, m).detach().double() @ x for m, x in probes.items()}


class _Run:
    """One run's state and steps; ``run()`` below is the entry point."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.precision = resolve_precision(config.train.precision)
        self.model, self.tokenizer = load_model(
            config.model.name, precision=self.precision, seed=config.seed
        )
        self.data: FederatedData = run_data(config, self.tokenizer)
        self.shapes = target_shapes(self.model, config.model.target_modules)
        self.server = Server(config, self.shapes)
        self.probes = sketch_probes(self.shapes, config.seed)
        base = _server_sketch(self.model, self.probes)
        self.sketches = {
            k: {m: s.clone() for m, s in base.items()} for k in range(self.server.num_clients)
        }
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.pad_id = int(self.tokenizer.pad_token_id)

    # --- evaluation ---------------------------------------------------------------------------
    def heldout_loss(self) -> float:
        with applied(self.model, self.server.global_lora):
            return evaluate_loss(
                self.model,
                self.data.heldout,
                batch_size=self.config.eval.batch_size,
                pad_id=self.pad_id,
                precision=self.precision,
            )

    def mmlu(self, t: int) -> None:
        """An ``mmlu`` metrics row of the global model after round ``t``, where eval.mmlu asks."""
        if not self.config.eval.mmlu_at(t, self.config.federation.rounds):
            return
        from flora.evaluation.during_run import mmlu_row  # flora.evaluation imports this module

        with applied(self.model, self.server.global_lora):
            row = mmlu_row(self.model, self.tokenizer, self.config.eval, t, self.precision)
        self.metrics.write(row)

    def samples(self) -> list[dict[str, str]]:
        out = []
        with applied(self.model, self.server.global_lora):
            for record in self.data.heldout_records[: self.config.eval.samples]:
                answer = generate_answer(
                    self.model,
                    self.tokenizer,
                    record["instruction"],
                    record.get("context", ""),
                    template=self.config.data.template,  # type: ignore[arg-type]
                    max_new_tokens=self.config.eval.max_new_tokens,
                    precision=self.precision,
                )
                out.append({"instruction": record["instruction"], "answer": answer})
        return out

    # --- one round ----------------------------------------------------------------------------
    def round(self, t: int, bar: tqdm) -> None:
        start = time.perf_counter()
        tasks = self.server.configure(t)
        server_sketch = _server_sketch(self.model, self.probes)
        results, train_seconds, drift = [], 0.0, 0.0
        for task in tasks:
            bar.set_description(f"round {t}/{self.config.federation.rounds} client {task.client}")
            apply_to_sketch(self.sketches[task.client], self.probes, task.catch_up)
            drift = max(drift, sketch_drift(self.sketches[task.client], server_sketch))
            result = train_client(
                self.model,
                self.data.clients[task.client],
                rank=task.rank,
                alpha=task.alpha,
                target_modules=self.config.model.target_modules,
                config=dataclasses.replace(self.config.train, precision=self.precision),
                seed=task.seed,
                pad_id=self.pad_id,
                init=task.init,
                freeze_A=task.freeze_A,
                use_rslora=self.config.lora.use_rslora,
            )
            train_seconds += result.seconds
            results.append(result)
            bar.update(1)
        agg_start = time.perf_counter()
        update, report = self.server.aggregate(
            t, tasks, [r.factors for r in results], [r.examples for r in results]
        )
        if update is not None:
            merge_into_base(self.model, _deltas(update))
        aggregate_seconds = time.perf_counter() - agg_start
        for task, result, up in zip(tasks, results, report.bytes_up, strict=True):
            self.metrics.write(
                {
                    "kind": "client",
                    "round": t,
                    "client": task.client,
                    "rank": task.rank,
                    "train_loss": result.train_loss,
                    "examples": result.examples,
                    "tokens": result.tokens,
                    "steps": result.steps,
                    "seconds": result.seconds,
                    "bytes_up": up,
                    "bytes_down": task.bytes_down,
                    "catch_up_rounds": len(task.catch_up),
                }
            )
        row: dict[str, Any] = {
            "kind": "server",
            "round": t,
            "method": self.server.method.name,
            "clients": [task.client for task in tasks],
            "noise": report.noise,
            "global_rank": max(report.global_ranks.values()),
            "bytes_up": sum(report.bytes_up),
            "bytes_down": sum(task.bytes_down for task in tasks),
            "base_drift": drift,
            "aggregate_seconds": aggregate_seconds,
            "train_seconds": train_seconds,
        }
        every = self.config.eval.every
        if every and t % every == 0 and t != self.config.federation.rounds:
            row["heldout_loss"] = self.heldout_loss()
        row["round_seconds"] = time.perf_counter() - start
        row["outside_training_share"] = 1.0 - train_seconds / row["round_seconds"]
        self.metrics.write(row)
        self.mmlu(t)
        save_checkpoint(
            self.run_dir, t, self.server.state(), update, self.server.global_lora, self.sketches
        )

    def restore(self) -> int:
        checkpoint = load_checkpoint(self.run_dir)
        self.server.restore(checkpoint.state, checkpoint.history, checkpoint.global_lora)
        for update in checkpoint.history:  # W0 + each round's update, in order: bitwise as run
            merge_into_base(self.model, _deltas(update))
        self.sketches = checkpoint.sketches or self.sketches
        self.metrics.truncate(checkpoint.round)
        return checkpoint.round

    def finish(self) -> Path:
        final = self.run_dir / "final"
        save_final(final, self.model, self.tokenizer, self.config, self.server.global_lora)
        return final


def save_final(
    final: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: RunConfig,
    lora: Adapter | None,
) -> None:
    """``final/model`` (the base with ``lora`` merged) and, with a global LoRA, ``final/adapter``
    (a PEFT adapter over the run's base model); both runtimes end a run with it."""
    with applied(model, lora):
        model.save_pretrained(final / "model")
        tokenizer.save_pretrained(final / "model")
    if lora is not None:
        template = {
            "base_model_name_or_path": config.model.name,
            "target_modules": config.model.target_modules,
        }
        save_peft_adapter(final / "adapter", lora, template=template)


def run(
    config: RunConfig, run_dir: Path, *, resume: bool = False, quiet: bool = False
) -> RunResult:
    """Run (or resume) a federated fine-tuning in ``run_dir``; see the module docstring."""
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        if (run_dir / "metrics.jsonl").exists():
            raise FloraError(
                f"{run_dir} already holds a run; use --resume {run_dir} or another --out"
            )
        atomic_write_json(run_dir / "config.json", config_to_dict(config))
    state = _Run(config, run_dir)
    say = (lambda *_: None) if quiet else print
    first = 1
    if resume:
        first = state.restore() + 1
        before = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval")
        loss_before, samples_before = float(before["heldout_loss"]), before.get("samples", [])
        say(f"resuming {run_dir} after round {first - 1}")
    else:
        say(state.data.table)
        loss_before, samples_before = state.heldout_loss(), state.samples()
        state.metrics.write(
            {
                "kind": "eval",
                "round": 0,
                "heldout_loss": loss_before,
                "perplexity": math.exp(loss_before),
                "samples": samples_before,
            }
        )
        state.mmlu(0)
    rounds = config.federation.rounds
    per_round = len(state.server.sample(1))
    with tqdm(total=(rounds - first + 1) * per_round, disable=quiet, unit="client") as bar:
        for t in range(first, rounds + 1):
            state.round(t, bar)
    loss_after, samples_after = state.heldout_loss(), state.samples()
    state.metrics.write(
        {
            "kind": "eval",
            "round": rounds,
            "heldout_loss": loss_after,
            "perplexity": math.exp(loss_after),
            "samples": samples_after,
            "final": True,
        }
    )
    state.finish()
    samples = [
        {"instruction": b["instruction"], "before": b["answer"], "after": a["answer"]}
        for b, a in zip(samples_before, samples_after, strict=False)
    ]
    result = RunResult(run_dir, loss_before, loss_after, samples, time.perf_counter() - start)
    atomic_write_json(
        run_dir / "summary.json", dataclasses.asdict(result) | {"run_dir": str(run_dir)}
    )
    return result


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FloraError(f"{run_dir}: no config.json; is it a flora run directory?")
    return config_from_dict(json.loads(path.read_text(encoding="utf-8")))
