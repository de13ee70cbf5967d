"""The embedded runtime: K clients simulated in one process over ONE shared base model.

Each sampled client injects its LoRA into the shared model, trains, hands back its factors and
removes the LoRA (flora.client.client_round over flora.training), so peak memory does not grow
with K. The round's update goes into the same model (flora.engine.GlobalModel), so a client's
"catch-up" is bookkeeping: a sketch per client (W_m x_m for a fixed probe x_m) follows what its
own base would hold, and ``base_drift`` in the server row measures it against the server's.
Every round ends with the shared rows and checkpoint (flora.engine.RunCore.end_round);
``resume`` replays the merged history onto the freshly built base, bitwise equal to an
uninterrupted run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.client import ClientResult, client_round
from flora.config import RunConfig
from flora.engine import RunCore
from flora.outputs import RunResult
from flora.protocol import ClientTask, apply_to_sketch, sketch_drift, sketch_probes
from flora.weights import module_weight

__all__ = ["RunResult", "run"]


class _SharedBase:
    """The shared model as a client's base: it already holds every merged update, so catching
    up moves the client's sketch (and measures its drift from the server's base)."""

    def __init__(self, core: RunCore, sketches: dict[int, dict[str, torch.Tensor]]) -> None:
        self.model: PreTrainedModel = core.model.model
        self.tokenizer: PreTrainedTokenizerBase = core.model.tokenizer
        self.probes = sketch_probes(core.model.shapes, core.config.seed)
        self.sketches = sketches or {k: self.sketch() for k in range(core.server.num_clients)}
        self.server_sketch: dict[str, torch.Tensor] = {}
        self.drift = 0.0

    def sketch(self) -> dict[str, torch.Tensor]:
        """W_m @ x_m of the shared model, per module (float64)."""
        sketch = {}
        for m, x in self.probes.items():
            weight = module_weight(self.model, m)
            if weight.device.type == "mps":  # no float64 on Apple GPUs
                weight = weight.cpu()
            sketch[m] = (weight.double() @ x.to(weight.device)).cpu()
        return sketch

    def start_round(self) -> None:
        self.server_sketch, self.drift = self.sketch(), 0.0

    def catch_up(self, task: ClientTask) -> None:
        apply_to_sketch(self.sketches[task.client], self.probes, task.catch_up)
        self.drift = max(self.drift, sketch_drift(self.sketches[task.client], self.server_sketch))


def _round(core: RunCore, base: _SharedBase, t: int, bar: tqdm) -> None:
    start = time.perf_counter()
    tasks = core.server.configure(t)
    base.start_round()
    results: list[ClientResult] = []
    for task in tasks:
        bar.set_description(f"round {t}/{core.config.federation.rounds} client {task.client}")
        data = core.model.client_data(task.client)
        result = client_round(base, data, task, core.config)
        if result.error is not None:
            print(f"flora: round {t}, client {task.client} failed: {result.error}",
                  file=sys.stderr)  # fmt: skip
        results.append(result)
        bar.update(1)
    core.server.complete(tasks, done=[r.client for r in results if r.error is None])
    outcome = core.server.aggregate(t, tasks, results)
    train_seconds = sum(r.seconds for r in results)
    seconds = time.perf_counter() - start
    extra: dict[str, Any] = {"base_drift": base.drift, "round_seconds": seconds,
                             "outside_training_share": 1.0 - train_seconds / seconds}  # fmt: skip
    core.end_round(t, tasks, results, outcome, extra, sketches=base.sketches)


def run(
    config: RunConfig, run_dir: Path, *, resume: bool = False, quiet: bool = False
) -> RunResult:
    """Run (or resume) a federated fine-tuning in ``run_dir``; see the module docstring."""
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    hint = f"use --resume {run_dir} or another --out"
    core = RunCore(config, run_dir, resume=resume, hint=hint)
    try:
        return _run(core, run_dir, quiet, start)
    finally:
        core.close()


def _run(core: RunCore, run_dir: Path, quiet: bool, start: float) -> RunResult:
    config = core.config
    sketches = core.checkpoint.sketches if core.checkpoint is not None else {}
    base = _SharedBase(core, sketches)
    say = (lambda *_: None) if quiet else print
    if core.resumed:
        say(f"resuming {run_dir} after round {core.first_round - 1}")
    else:
        say(core.model.data.table)
        core.evaluate(0)
    rounds = config.federation.rounds
    per_round = len(core.server.sample(1))
    with tqdm(total=(rounds - core.first_round + 1) * per_round, disable=quiet,
              unit="client") as bar:  # fmt: skip
        for t in range(core.first_round, rounds + 1):
            _round(core, base, t, bar)
    return core.finish(time.perf_counter() - start, "embedded")
