"""DP-SGD's cost: a client's training with opacus' per-example clipping and noise against the
same training without them.

Both contenders are `flora.training.train_client` on the packaged SmolLM2-135M-Instruct (LoRA
r=8 on q_proj, v_proj) over the same client's Dolly examples, the same Poisson batches
(train.sampling = "poisson", loss_weighting = "examples": DP-SGD's own batches, so the ratio is
the price of the per-example gradients, the clipping and the noise alone) and the same steps:

- plain: no privacy, no clipping;
- dp-sgd: privacy.noise_multiplier 1.0, max_grad_norm 1.0 (opacus' GradSampleModule and
  DPOptimizer).

After a warm-up call of each, they run interleaved (plain, dp, dp, plain, ...), and the figure
is the median over repeats of dp / plain in process CPU seconds per call (which other jobs on a
shared machine change far less than wall time), with the wall-time ratio beside it.

    .venv/bin/python bench/dp_sgd.py --threads 1        # about 3 minutes here
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from client_data import smollm2_client  # bench/: run as a script, its folder is on sys.path
from flora.models import resolve_precision
from flora.privacy.dp_sgd import DPSGD
from flora.training import TrainConfig, train_client

SEED = 0


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="the client's examples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision)
    model, tokenizer, examples = smollm2_client(args.examples, args.max_length, precision, 11)
    config = TrainConfig(
        batch_size=args.batch_size,
        max_steps=args.steps,
        precision=precision,
        sampling="poisson",
        loss_weighting="examples",
        max_grad_norm=0.0,
        lora_dropout=0.0,
    )
    privacy = DPSGD(1.0, 1.0, args.batch_size, reproducible_noise=True)

    def call(private: bool) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        train_client(
            model,
            examples,
            rank=8,
            alpha=16,
            target_modules=["q_proj", "v_proj"],
            config=config,
            seed=SEED,
            pad_id=int(tokenizer.pad_token_id),
            privacy=privacy if private else None,
        )
        return time.process_time() - cpu, time.perf_counter() - wall

    call(False), call(True)  # warm-up: first-use allocations, opacus' import
    cpu_ratios, wall_ratios, plain_cpu, dp_cpu = [], [], [], []
    for repeat in range(args.repeats):
        order_ = (False, True) if repeat % 2 == 0 else (True, False)
        timed = {private: call(private) for private in order_}
        cpu_ratios.append(timed[True][0] / timed[False][0])
        wall_ratios.append(timed[True][1] / timed[False][1])
        plain_cpu.append(timed[False][0])
        dp_cpu.append(timed[True][0])
    figures = {
        "dp_over_plain_cpu": statistics.median(cpu_ratios),
        "dp_over_plain_wall": statistics.median(wall_ratios),
        "plain_cpu_seconds_per_call": statistics.median(plain_cpu),
        "dp_cpu_seconds_per_call": statistics.median(dp_cpu),
    }
    print(
        f"SmolLM2-135M, {precision}, {len(examples)} examples, batch {args.batch_size}, "
        f"{args.steps} steps, max_length {args.max_length}, torch threads "
        f"{torch.get_num_threads()}, {args.repeats} repeats"
    )
    print(
        f"DP-SGD / plain: {figures['dp_over_plain_cpu']:.2f}x CPU seconds "
        f"({figures['dp_over_plain_wall']:.2f}x wall); plain "
        f"{figures['plain_cpu_seconds_per_call']:.1f} s, dp-sgd "
        f"{figures['dp_cpu_seconds_per_call']:.1f} s per call (medians)"
    )
    if args.json:
        baseline = "the same training (same Poisson batches) without DP-SGD"
        out = {
            "DP-SGD training time": {
                "value": figures["dp_over_plain_cpu"],
                "unit": "x",
                "baseline": baseline + ", CPU seconds",
                "goal": None,
            },
            "DP-SGD training wall time": {
                "value": figures["dp_over_plain_wall"],
                "unit": "x",
                "baseline": baseline + ", wall seconds",
                "goal": None,
            },
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
