"""The CPU's precision under ``train.precision = "auto"``: bf16 autocast against fp32 training.

``auto`` picks bf16 autocast on CPUs with bf16 in hardware (AMX, AVX512-BF16, SVE-BF16) and fp32
elsewhere (flora.devices.resolve_precision). This measures that choice where it applies: one
SmolLM2-135M client (r 16 on q and v, batch 4, Dolly at max_length 160) trains an epoch of its
examples in fp32 and in bf16 autocast, interleaved, rotating the order each repeat; reported are
the median over repeats of bf16 / fp32 examples per CPU second and per wall second, and both
training losses (bf16's rounding shows there).

    .venv/bin/python bench/cpu_precision.py --threads 1            # ~3 min
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
from flora.devices import _native_bf16
from flora.training import TrainConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=24, help="the client's examples")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", type=Path, help="write the figures here (make bench)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, examples = smollm2_client(args.examples, args.max_length, "fp32", 7)
    native = _native_bf16()
    print(
        f"SmolLM2-135M, {len(examples)} examples, batch {args.batch_size}, max_length "
        f"{args.max_length}, 1 epoch, torch threads {torch.get_num_threads()}, bf16 in hardware: "
        f"{native}"
    )

    def epoch(precision: str) -> tuple[float, float, float]:
        config = TrainConfig(batch_size=args.batch_size, local_epochs=1.0, precision=precision)
        return timed_epoch(model, tokenizer, examples, config)

    epoch("bf16")  # warm-up: first-use allocations and kernels of both
    epoch("fp32")
    modes = ["fp32", "bf16"]
    rows: list[dict[str, tuple[float, float, float]]] = []
    for r in range(args.repeats):
        order = modes[r % 2 :] + modes[: r % 2]
        rows.append({name: epoch(name) for name in order})
    print(f"\n{'precision':<10} {'ex/CPU-s':>9} {'ex/s':>7} {'train loss':>10}")
    for name in modes:
        cpu, wall, loss = (statistics.median(row[name][i] for row in rows) for i in range(3))
        print(f"{name:<10} {cpu:>9.3f} {wall:>7.3f} {loss:>10.4f}")
    ratios = [[row["bf16"][i] / row["fp32"][i] for row in rows] for i in range(2)]
    cpu_ratio, wall_ratio = (statistics.median(r) for r in ratios)
    print(
        f"\nbf16 / fp32, median over {args.repeats} repeats: {cpu_ratio:.2f}x examples per CPU "
        f"second, {wall_ratio:.2f}x per wall second"
    )
    if args.json:
        figures = {
            "bf16 autocast training throughput on this CPU": {
                "value": cpu_ratio,
                "unit": "x",
                "baseline": f"fp32 training, examples per CPU second (bf16 in hardware: {native})",
                "goal": None,
            }
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
