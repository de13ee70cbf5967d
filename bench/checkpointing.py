"""Training memory with gradient checkpointing against without it (train.gradient_checkpointing).

Each setting runs in a fresh subprocess: SmolLM2-135M-Instruct (packaged), one rank-16 LoRA on
q,v, batch 4 of 512-token examples (random token ids, the second half supervised), 2 optimizer
steps, fp32. It reports the peak resident set while training (flora.memory, the client rows'
``peak_rss_mib``), its growth over the resident set before training, and the seconds per step;
the baseline is the run without checkpointing, measured in the same invocation.

    .venv/bin/python bench/checkpointing.py               # about 2 minutes on 2 cores
    .venv/bin/python bench/checkpointing.py --length 256 --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any


def worker(checkpointing: bool, length: int, threads: int) -> dict[str, Any]:
    import torch

    from flora.config import TrainConfig
    from flora.memory import rss_mib
    from flora.models import load_model
    from flora.training import train_client

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model("smollm2")
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(4):
        ids = torch.randint(100, len(tokenizer) - 1, (length,), generator=generator).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        examples.append({"input_ids": ids, "labels": labels, "category": "bench"})
    before = rss_mib("VmHWM") or 0.0
    config = TrainConfig(batch_size=4, max_steps=2, lora_dropout=0.0,
                         gradient_checkpointing=checkpointing)  # fmt: skip
    result = train_client(
        model, examples, rank=16, alpha=32.0, target_modules=["q_proj", "v_proj"],
        config=config, seed=0, pad_id=int(tokenizer.pad_token_id),
    )  # fmt: skip
    peak = result.peak_rss_mib or 0.0
    return {"checkpointing": checkpointing, "peak_rss_mib": peak, "before_mib": before,
            "growth_mib": peak - before, "seconds_per_step": result.seconds / result.steps,
            "loss": result.train_loss}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker == "on", args.length, args.threads)))
        return
    rows = []
    for setting in ("off", "on"):
        command = [sys.executable, __file__, "--worker", setting, "--length", str(args.length),
                   "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"SmolLM2-135M, LoRA r=16 on q,v, batch 4 x {args.length} tokens, fp32, 2 steps")
    print(f"{'checkpointing':<14}{'peak RSS MiB':>13}{'growth MiB':>12}{'x growth':>10}"
          f"{'s/step':>9}{'x time':>8}{'loss':>9}")  # fmt: skip
    for row in rows:
        name = "on" if row["checkpointing"] else "off"
        growth = row["growth_mib"] / base["growth_mib"]
        time = row["seconds_per_step"] / base["seconds_per_step"]
        print(
            f"{name:<14}{row['peak_rss_mib']:>13.0f}{row['growth_mib']:>12.0f}{growth:>10.2f}"
            f"{row['seconds_per_step']:>9.2f}{time:>8.2f}{row['loss']:>9.4f}"
        )


if __name__ == "__main__":
    main()
