"""The embedded runtime: K clients simulated in one process over ONE shared base model.

Each sampled client injects its LoRA into the shared model, trains, hands back its factors and
removes the LoRA (flora.client.client_round over flora.training), so peak memory does not grow
with K. The round's update goes into the same model (flora.engine.GlobalModel), so a client's
"catch-up" is bookkeeping: a sketch per client (W_m x_m for a fixed probe x_m) follows what its
own base would hold, and ``base_drift`` in the server row measures it against the server's.
The round loop, rows and checkpoints are the core's (flora.engine.RunCore.play_round);
``resume`` replays the merged history onto the freshly built base, bitwise equal to an
uninterrupted run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.client import ClientResult, client_round
from flora.config import RunConfig
from flora.engine import RunCore, Runtime, drive
from flora.outputs import RunResult
from flora.protocol import ClientTask, apply_to_sketch, sketch_drift, sketch_probes
from flora.weights import module_weight

__all__ = ["Embedded", "RunResult", "SharedBase", "run"]


class SharedBase:
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


class Embedded(Runtime):
    """The embedded runtime: every sampled client's round in this process, one after another,
    on the one shared model."""

    name = "embedded"

    def __init__(self, core: RunCore, quiet: bool) -> None:
        sketches = core.checkpoint.sketches if core.checkpoint is not None else {}
        self.core = core
        self.base = SharedBase(core, sketches)
        rounds = core.config.federation.rounds
        per_round = len(core.server.sample(1))
        self.bar = tqdm(
            total=(rounds - core.first_round + 1) * per_round, disable=quiet, unit="client"
        )

    def run_client(self, task: ClientTask) -> ClientResult:
        """One client's round on the shared model."""
        data = self.core.model.client_data(task.client)
        result = client_round(self.base, data, task, self.core.config)
        if result.error is not None:
            print(
                f"flora: round {task.round}, client {task.client} failed: {result.error}",
                file=sys.stderr,
            )
        return result

    def execute(self, round: int, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        self.base.start_round()
        results = []
        for task in tasks:
            rounds = self.core.config.federation.rounds
            self.bar.set_description(f"round {round}/{rounds} client {task.client}")
            results.append(self.run_client(task))
            self.bar.update(1)
        return results

    def fields(self, round: int, results: Sequence[ClientResult], seconds: float) -> dict[str, Any]:
        train_seconds = sum(r.seconds for r in results)
        return {
            "base_drift": self.base.drift,
            "outside_training_share": 1.0 - train_seconds / seconds,
        }

    def sketches(self) -> dict[int, dict[str, torch.Tensor]]:
        return self.base.sketches

    def close(self) -> None:
        self.bar.close()


def run(
    config: RunConfig, run_dir: Path, *, resume: bool = False, quiet: bool = False
) -> RunResult:
    """Run (or resume) a federated fine-tuning in ``run_dir``; see the module docstring."""
    return drive(config, run_dir, Embedded, resume=resume, quiet=quiet)
