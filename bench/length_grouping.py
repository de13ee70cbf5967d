"""Length-grouped batches (train.group_by_length) against shuffled ones: padding and speed.

One client's local epoch over the same Dolly examples (chat template, SmolLM2-135M-Instruct,
LoRA r=16 on q_proj and v_proj), once with shuffled batches (the default) and once with batches
of similar length, interleaved over --repeats (rotating which goes first). Reported per mode:
the share of padding in the batches, examples per CPU second of this process (which other jobs
on the machine change far less than wall time) and per wall second, and the epoch's mean train
loss; then the median over repeats of grouped / shuffled. Both modes feed exactly the same
tokens; only the batch order and padding differ.

    .venv/bin/python bench/length_grouping.py --threads 1                 # ~4 min
    .venv/bin/python bench/length_grouping.py --threads 1 --max-length 512

Measured (96 examples, batch 8, max_length 160, bf16, 1 thread, 2 repeats): padding 33.4% ->
3.9%, 1.47x examples per CPU second and per wall second.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from client_data import (  # bench/: run as a script, its folder is on sys.path
    smollm2_client,
    timed_epoch,
)
from flora.data import Example, batches
from flora.models import resolve_precision
from flora.training import TrainConfig

SEED = 0


def padding(examples: list[Example], batch_size: int, grouped: bool) -> float:
    lengths = [len(e["input_ids"]) for e in examples]
    chunks = batches(list(range(len(examples))), batch_size, SEED, 0, lengths if grouped else None)
    fed = [(len(chunk), max(lengths[i] for i in chunk)) for chunk in chunks]
    return 1 - sum(lengths) / sum(n * width for n, width in fed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=96, help="the client's examples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160, help="as configs/default.toml")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", type=Path, help="write the figures here (make bench)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision)
    model, tokenizer, examples = smollm2_client(args.examples, args.max_length, precision, 7)
    print(
        f"SmolLM2-135M, {precision}, {len(examples)} examples, batch {args.batch_size}, "
        f"max_length {args.max_length}, 1 epoch, torch threads {torch.get_num_threads()}"
    )

    def epoch(grouped: bool) -> tuple[float, float, float]:
        config = TrainConfig(
            batch_size=args.batch_size,
            local_epochs=1.0,
            precision=precision,
            group_by_length=grouped,
        )
        return timed_epoch(model, tokenizer, examples, config)

    epoch(False)  # warm-up: first-use allocations
    modes = {"shuffled": False, "grouped": True}
    rows: list[dict[str, tuple[float, float, float]]] = []
    for r in range(args.repeats):
        names = list(modes)[r % 2 :] + list(modes)[: r % 2]
        rows.append({name: epoch(modes[name]) for name in names})
    print(f"\n{'batches':<10} {'padding':>8} {'ex/CPU-s':>9} {'ex/s':>7} {'train loss':>10}")
    for name, grouped in modes.items():
        cpu, wall, loss = (statistics.median(row[name][i] for row in rows) for i in range(3))
        share = padding(examples, args.batch_size, grouped)
        print(f"{name:<10} {share:>8.1%} {cpu:>9.3f} {wall:>7.3f} {loss:>10.4f}")
    ratios = [[row["grouped"][i] / row["shuffled"][i] for row in rows] for i in range(2)]
    print(
        f"\ngrouped / shuffled, median over {args.repeats} repeats: "
        f"{statistics.median(ratios[0]):.2f}x examples per CPU second, "
        f"{statistics.median(ratios[1]):.2f}x per wall second"
    )
    if args.json:
        figures = {
            "length-grouped training throughput": {
                "value": statistics.median(ratios[0]),
                "unit": "x",
                "baseline": "shuffled batches, examples per CPU second",
                "goal": None,
            }
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
