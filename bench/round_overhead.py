"""Round overhead of the embedded runtime: the share of a round spent outside client training.

Runs `flora.simulation.run` on configs/default.toml (SmolLM2-135M, FLoRA stacking, hetero-10
ranks) with small overrides: --clients clients (ranks cycle through hetero-10), --rounds rounds,
--max-steps local steps (3 by default: fewer steps make the fixed costs weigh more, so the share
is an upper bound for longer rounds), eval.samples=0, data.heldout=16. It reads the server rows of
metrics.jsonl: round_seconds, train_seconds (the sum of train_client's own seconds, LoRA injection
and extraction included), aggregate_seconds (aggregation + merge into the base) and
outside_training_share = 1 - train / round. The baseline is the round itself; the goal is a
median outside_training_share <= 5%.

What the "round" is: the runtime's round_seconds covers configure, per-client sketches, training,
aggregation, merging and metrics; it excludes the held-out evaluation before and after the run
(eval.every = 0) and the checkpoint written after the row. This script also times that checkpoint
(by wrapping flora.outputs.save_checkpoint) and peft's LoRA injection + unload inside
train_client (by wrapping flora.training.LoraModel), and prints the share with the checkpoint
counted in.

    .venv/bin/python bench/round_overhead.py                        # 10 clients, 2 rounds, ~3 min
    .venv/bin/python bench/round_overhead.py --threads 1   # on a 2-core machine shared with others
    .venv/bin/python bench/round_overhead.py --clients 4 --rounds 2 --max-steps 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import flora.outputs
import flora.simulation
import flora.training
from flora.config import RANK_PROFILES, load_config
from flora.metrics import read_metrics
from flora.models import resolve_precision

TIMES: defaultdict[str, list[float]] = defaultdict(list)  # "checkpoint" / "peft" -> seconds


class _TimedLoraModel(flora.training.LoraModel):
    """peft's LoraModel, timing its in-place injection and its unload."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().__init__(*args, **kwargs)
        TIMES["peft"].append(time.perf_counter() - start)

    def unload(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().unload(*args, **kwargs)
        finally:
            TIMES["peft"].append(time.perf_counter() - start)


_save_checkpoint = flora.outputs.save_checkpoint


def _timed_checkpoint(*args: Any, **kwargs: Any) -> None:
    start = time.perf_counter()
    _save_checkpoint(*args, **kwargs)
    TIMES["checkpoint"].append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--json", type=Path, help="write the figures here (make bench)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    hetero = RANK_PROFILES["hetero-10"]
    ranks = [hetero[k % len(hetero)] for k in range(args.clients)]
    overrides = [
        f"federation.num_clients={args.clients}",
        f"lora.ranks={ranks}",
        f"federation.rounds={args.rounds}",
        f"train.max_steps={args.max_steps}",
        "eval.samples=0",
        "data.heldout=16",
    ]
    config = load_config(args.config, overrides)
    flora.training.LoraModel = _TimedLoraModel
    flora.outputs.save_checkpoint = _timed_checkpoint  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        flora.simulation.run(config, Path(tmp) / "run", quiet=True)
        total = time.perf_counter() - start
        rows = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    server = [r for r in rows if r.get("kind") == "server"]
    clients = [r for r in rows if r.get("kind") == "client"]
    peft_per_round = sum(TIMES["peft"]) / len(server)

    print(f"{args.config} with {' '.join(overrides)}")
    precision = resolve_precision(config.train.precision)
    print(
        f"torch threads {torch.get_num_threads()}, precision {precision}, "
        f"whole run {total:.1f} s (model load and evals included)"
    )
    header = ("round", "round s", "train s", "aggregate s", "outside", "ckpt s", "outside+ckpt")
    print("\n" + "{:>5} {:>9} {:>9} {:>12} {:>8} {:>8} {:>13}".format(*header))
    shares, with_ckpt = [], []
    for row, ckpt in zip(server, TIMES["checkpoint"], strict=True):
        share = row["outside_training_share"]
        share_ckpt = 1 - row["train_seconds"] / (row["round_seconds"] + ckpt)
        shares.append(share)
        with_ckpt.append(share_ckpt)
        print(
            f"{row['round']:>5} {row['round_seconds']:>9.2f} {row['train_seconds']:>9.2f} "
            f"{row['aggregate_seconds']:>12.3f} {share:>8.2%} {ckpt:>8.3f} {share_ckpt:>13.2%}"
        )
    median, median_ckpt = statistics.median(shares), statistics.median(with_ckpt)
    verdict = "ok" if median <= 0.05 else "MISS"
    print(f"\nmedian outside_training_share {median:.2%} (goal <= 5%: {verdict})")
    print(f"median share counting the checkpoint {median_ckpt:.2%}")
    steps = sum(r["steps"] for r in clients)
    tokens = sum(r["tokens"] for r in clients)
    train = sum(r["train_seconds"] for r in server)
    print(
        f"inside train_client: peft inject + unload {peft_per_round:.2f} s/round "
        f"({peft_per_round * len(server) / train:.2%} of train_seconds), "
        f"{tokens / train:.1f} tokens/s over {steps} steps"
    )
    if args.json:
        figures = {
            "share of a round outside training": {
                "value": median,
                "unit": "share",
                "goal": "<= 0.05",
                "baseline": "the round's time (server rows' outside_training_share, median)",
            },
            "share of a round outside training, checkpoint counted": {
                "value": median_ckpt,
                "unit": "share",
                "goal": None,
                "baseline": "the round's time plus its checkpoint",
            },
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
