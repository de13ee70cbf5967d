"""Training memory of one client per setting, as ratios to the fp32 run (bench/memory.py's
second part; runnable alone).

Each setting runs in a fresh subprocess: SmolLM2-135M-Instruct (packaged), one rank-16 LoRA on
q,v, batch 4 of 512-token examples (random token ids, the second half supervised), 2 optimizer
steps. Settings: fp32; fp32 with train.gradient_checkpointing; a bf16 base (model.dtype =
"bf16", fp32 master copies of q,v, bf16 autocast); bf16 with checkpointing; a 4-bit NF4 base
(model.quantization = 4, bitsandbytes). It reports the peak resident set while training
(flora.memory, the client rows' ``peak_rss_mib``), the model's weights as held
(``get_memory_footprint``), the growth of the resident set while training (activations,
gradients, optimizer state, autocast's weight copies), each as a ratio to the fp32 run measured
in the same invocation, and the seconds per step.

    .venv/bin/python bench/memory_settings.py              # about 4 minutes on 2 cores
    .venv/bin/python bench/memory_settings.py --length 256 --settings fp32 bf16
    python bench/memory_settings.py --device cuda --peak-tflops 989   # a GPU: its own peak

Each row also gives the training tokens per second, and with ``--peak-tflops`` (the device's
dense bf16 peak) the MFU, 6 N tokens/s over that peak (the usual convention: it counts the frozen
base's weight gradients, which LoRA never computes). On CUDA the peak is the GPU's own
(``peak_cuda_mib``), not the resident set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp32+ckpt": {"gradient_checkpointing": True},
    "bf16": {"dtype": "bf16"},
    "bf16+ckpt": {"dtype": "bf16", "gradient_checkpointing": True},
    "nf4": {"dtype": "bf16", "quantization": 4},
}


def worker(
    setting: str, length: int, threads: int, device: str = "cpu", peak_tflops: float = 0.0
) -> dict[str, Any]:
    import torch

    from flora.config import TrainConfig
    from flora.memory import rss_mib
    from flora.models import load_model
    from flora.training import train_client

    if threads:
        torch.set_num_threads(threads)
    options = SETTINGS[setting]
    dtype, bits = options.get("dtype", "fp32"), options.get("quantization", 0)
    precision = "bf16" if dtype == "bf16" else "fp32"
    targets = ["q_proj", "v_proj"]
    keep = targets if dtype != "fp32" or bits else []
    model, tokenizer = load_model(
        "smollm2",
        dtype=dtype,
        quantization=bits,
        keep_fp32=keep,
        precision=precision,
        device=device,
    )
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(4):
        ids = torch.randint(100, len(tokenizer) - 1, (length,), generator=generator).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        examples.append({"input_ids": ids, "labels": labels, "category": "bench"})
    held = model.get_memory_footprint() / 2**20  # parameters and buffers as held (quantised too)
    before = rss_mib("VmRSS") or 0.0
    checkpointing = bool(options.get("gradient_checkpointing", False))
    config = TrainConfig(
        batch_size=4,
        max_steps=2,
        lora_dropout=0.0,
        precision=precision,
        gradient_checkpointing=checkpointing,
    )
    result = train_client(
        model,
        examples,
        rank=16,
        alpha=32.0,
        target_modules=targets,
        config=config,
        seed=0,
        pad_id=int(tokenizer.pad_token_id),
    )
    cuda = device.startswith("cuda")
    peak = (result.peak_cuda_mib if cuda else result.peak_rss_mib) or 0.0
    rate = result.tokens / result.seconds if result.seconds else 0.0
    params = sum(p.numel() for p in model.parameters())
    return {
        "tokens_per_second": rate,
        "mfu": 6 * params * rate / (peak_tflops * 1e12) if peak_tflops else None,
        "setting": setting,
        "held_mib": held,
        "peak_rss_mib": peak,
        "before_mib": before,
        "growth_mib": peak - (0.0 if cuda else before),
        "seconds_per_step": result.seconds / result.steps,
        "loss": result.train_loss,
    }


def measure(
    settings: list[str], length: int, threads: int, device: str = "cpu", peak_tflops: float = 0.0
) -> list[dict[str, Any]]:
    rows = []
    for setting in settings:
        command = [
            sys.executable,
            __file__,
            "--worker",
            setting,
            "--length",
            str(length),
            "--threads",
            str(threads),
            "--device",
            device,
            "--peak-tflops",
            str(peak_tflops),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def figures(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each setting's peak resident memory and step time as ratios to the first (fp32)."""
    base, out = rows[0], {}
    for row in rows[1:]:
        for key, label in (("peak_rss_mib", "peak memory"), ("seconds_per_step", "step time")):
            out[f"{row['setting']} {label}"] = {
                "value": row[key] / base[key],
                "unit": "x",
                "goal": None,
                "baseline": f"the {base['setting']} base, same training",
            }
    return out


def report(rows: list[dict[str, Any]], length: int) -> None:
    base = rows[0]
    print(
        f"SmolLM2-135M, LoRA r=16 on q,v, batch 4 x {length} tokens, 2 steps; "
        f"ratios to {base['setting']}"
    )
    print(
        f"{'setting':<11}{'held MiB':>9}{'x':>6}{'peak MiB':>9}{'x':>6}{'growth MiB':>11}"
        f"{'x':>6}{'s/step':>8}{'x':>6}{'loss':>8}{'tok/s':>9}{'MFU':>7}"
    )
    for row in rows:
        print(
            f"{row['setting']:<11}{row['held_mib']:>9.0f}"
            f"{row['held_mib'] / base['held_mib']:>6.2f}{row['peak_rss_mib']:>9.0f}"
            f"{row['peak_rss_mib'] / base['peak_rss_mib']:>6.2f}{row['growth_mib']:>11.0f}"
            f"{row['growth_mib'] / base['growth_mib']:>6.2f}{row['seconds_per_step']:>8.2f}"
            f"{row['seconds_per_step'] / base['seconds_per_step']:>6.2f}{row['loss']:>8.4f}"
            f"{row['tokens_per_second']:>9.1f}"
            + (f"{row['mfu']:>7.1%}" if row.get("mfu") is not None else f"{'-':>7}"),
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--worker", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak, for MFU"
    )
    parser.add_argument("--json", type=Path, help="write the figures here (make bench)")
    args = parser.parse_args(argv)
    if args.worker:
        row = worker(args.worker, args.length, args.threads, args.device, args.peak_tflops)
        print(json.dumps(row))
        return
    rows = measure(args.settings, args.length, args.threads, args.device, args.peak_tflops)
    report(rows, args.length)
    if args.json:
        args.json.write_text(json.dumps(figures(rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
