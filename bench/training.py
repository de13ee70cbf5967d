"""Client training throughput: flora's train_client against a bare PEFT loop and HF Trainer.

Measures tokens/s (tokens = non-pad tokens fed) of `flora.training.train_client` on the packaged
SmolLM2-135M-Instruct against (a) a bare PEFT + torch loop written here and (b)
`transformers.Trainer`. All three use one shared base model, the same LoraConfig (r=16,
alpha=32, dropout 0.05, q_proj + v_proj), AdamW on the LoRA factors with grad-norm clip 1.0, the
same Dolly batches (flora.data.batches + collate, same seed and order), the same batch size,
max_length, precision (bf16 CPU autocast or fp32) and number of steps. Each call injects a fresh
LoRA, runs 1 warm-up step + --steps measured steps, and removes the LoRA.

After an untimed warm-up pass, the contenders run interleaved, rotating the order each repeat
(A,B,C, B,C,A, C,A,B: by default each one once in each position). Per contender, medians over
repeats of:
- steps: tokens of the measured steps / their time, optimizer-step end to optimizer-step end
  (collate, forward, backward, clip, step, zero_grad and any callbacks included), in wall
  seconds and in this process's CPU seconds (which other jobs on the machine change far less),
- call: all tokens / the whole call (LoRA injection, set-up, extraction, unload included),
- fixed: seconds per call outside the steps (before the first forward, after the last step).
Ratios are the median over repeats of flora / other within each repeat, which cancels drift.
Goals, judged on steps per CPU second: flora/bare >= 0.95 and flora/Trainer >= 1.0. The machine
is shared: compare ratios from one run, never absolute tokens/s across runs.

    .venv/bin/python bench/training.py --threads 1       # precision auto (bf16 here), ~5 min
    .venv/bin/python bench/training.py --threads 1 --precision fp32 --steps 3   # ~5 min
    .venv/bin/python bench/training.py --steps 3 --repeats 1   # quick look

Measured after flora.loss (the LM head on response positions only), bf16, --threads 1, 3
repeats: flora/bare 1.20, flora/Trainer 1.19 (before it: 1.01 and 1.02).

--threads 0 keeps torch's default (2 here). On this 2-core machine shared with other jobs, 2
intra-op threads wait on each other at every op (a ~4 ms scheduler slice each): steps run 3-14x
slower than with 1 thread and the ratios are noise, so use --threads 1 there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import SequentialSampler
from transformers import PreTrainedModel, Trainer, TrainingArguments

from flora.data import Example, batches, collate, encode_records, load_records
from flora.data._seed import make_rng
from flora.models import autocast_context, load_model, resolve_precision
from flora.training import TrainConfig, train_client

RANK, ALPHA, DROPOUT, LR, SEED = 16, 32, 0.05, 2e-4, 0
TARGETS = ["q_proj", "v_proj"]


@dataclass
class Clock:
    """Wall time of the first forward; wall and process CPU time of every optimizer step end."""

    first_forward: float = 0.0
    step_ends: list[tuple[float, float]] = field(default_factory=list)

    def reset(self) -> None:
        self.first_forward, self.step_ends = 0.0, []

    def step_end(self) -> None:
        self.step_ends.append((time.perf_counter(), time.process_time()))


CLOCK = Clock()


def install_hooks(model: PreTrainedModel) -> None:
    def on_forward(*_: object) -> None:
        if not CLOCK.first_forward:
            CLOCK.first_forward = time.perf_counter()

    model.model.register_forward_pre_hook(on_forward)  # the decoder: called once per step by all
    register_optimizer_step_post_hook(lambda *_: CLOCK.step_end())


def lora_config() -> LoraConfig:
    return LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=DROPOUT, bias="none"
    )


def run_flora(
    model: PreTrainedModel, examples: list[Example], pad: int, args: Any, packing: bool = False
) -> object:
    config = TrainConfig(
        lr=LR,
        batch_size=args.batch_size,
        max_steps=args.steps + 1,
        lora_dropout=DROPOUT,
        precision=args.precision,
        packing=packing,
    )
    return train_client(
        model,
        examples,
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGETS,
        config=config,
        seed=SEED,
        pad_id=pad,
    )


def run_bare(model: PreTrainedModel, examples: list[Example], pad: int, args: Any) -> object:
    peft_model = get_peft_model(model, lora_config())
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    peft_model.train()
    device = next(model.parameters()).device
    for chunk in batches(examples, args.batch_size, SEED, 0):
        batch = {k: v.to(device) for k, v in collate(chunk, pad).items()}
        with autocast_context(args.precision, device.type):
            loss = peft_model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    factors = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    peft_model.unload()
    return factors


class _InOrder(Trainer):
    def _get_train_sampler(self, train_dataset: Any = None) -> SequentialSampler:
        return SequentialSampler(self.train_dataset)  # type: ignore[arg-type]


def run_trainer(model: PreTrainedModel, examples: list[Example], pad: int, args: Any) -> object:
    peft_model = get_peft_model(model, lora_config())
    model.config.use_cache = False
    chunks = list(batches(examples, args.batch_size, SEED, 0))
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out,
            max_steps=args.steps + 1,
            per_device_train_batch_size=1,
            learning_rate=LR,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            bf16=args.precision == "bf16",
            use_cpu=next(model.parameters()).device.type == "cpu",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            remove_unused_columns=False,
            seed=SEED,
        )
        trainer = _InOrder(
            model=peft_model,
            args=training_args,
            train_dataset=chunks,
            data_collator=lambda items: collate(items[0], pad),
        )
        trainer.train()
    factors = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    peft_model.unload()
    model.config.use_cache = True
    return factors


def run_packed(model: PreTrainedModel, examples: list[Example], pad: int, args: Any) -> object:
    """flora with ``train.packing``: each step's examples in one row, no padding."""
    return run_flora(model, examples, pad, args, packing=True)


CONTENDERS: dict[str, Callable[[PreTrainedModel, list[Example], int, Any], object]] = {
    "flora": run_flora,
    "bare": run_bare,
    "trainer": run_trainer,
    "packed": run_packed,
}


def measure(
    name: str,
    model: PreTrainedModel,
    examples: list[Example],
    pad: int,
    args: Any,
    step_tokens: list[int],
) -> tuple[float, float, float, float]:
    """Tokens per wall and per CPU second over the measured steps; per wall second over the whole
    call; fixed wall seconds."""
    CLOCK.reset()
    start = time.perf_counter()
    CONTENDERS[name](model, examples, pad, args)
    seconds = time.perf_counter() - start
    ends = CLOCK.step_ends
    assert len(ends) == args.steps + 1, f"{name}: {len(ends)} optimizer steps"
    fixed = seconds - (ends[-1][0] - CLOCK.first_forward)  # setup before step 1 + teardown
    tokens = sum(step_tokens[1:])
    wall, cpu = (tokens / (ends[-1][i] - ends[0][i]) for i in range(2))
    return wall, cpu, sum(step_tokens) / seconds, fixed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=4, help="measured steps per call")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved calls per contender")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the device's dense bf16 peak in TFLOP/s for MFU (H100 SXM: 989; 0: no MFU)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here (make bench)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device)

    model, tokenizer = load_model("smollm2", device=device)
    model.requires_grad_(False)
    pad = int(tokenizer.pad_token_id)
    records = load_records("dolly")
    order = make_rng(SEED, 1).permutation(len(records)).tolist()
    needed = (args.steps + 1) * args.batch_size
    encoded = encode_records(
        [records[i] for i in order[: needed * 2]],
        tokenizer,
        template="chat",
        max_length=args.max_length,
    )
    examples = encoded.examples[:needed]
    step_tokens = [
        int(collate(chunk, pad)["attention_mask"].sum())
        for chunk in batches(examples, args.batch_size, SEED, 0)
    ]
    install_hooks(model)
    print(
        f"SmolLM2-135M, {args.precision}, batch {args.batch_size}, max_length {args.max_length}, "
        f"1 + {args.steps} steps, {sum(step_tokens) / len(step_tokens):.0f} tokens/step, "
        f"torch threads {torch.get_num_threads()}, {args.repeats} rotated repeats"
    )
    # warm-up: one untimed pass over every batch (first-use allocations and caches), and
    # one step of the others (imports, Trainer/accelerate set-up)
    run_flora(model, examples, pad, args)
    one_step = argparse.Namespace(**{**vars(args), "steps": 0})
    run_bare(model, examples[: args.batch_size], pad, one_step)
    run_trainer(model, examples[: args.batch_size], pad, one_step)
    run_packed(model, examples[: args.batch_size], pad, one_step)

    names = list(CONTENDERS)
    rows: list[dict[str, tuple[float, float, float, float]]] = []
    for r in range(args.repeats):
        rotated = names[r % len(names) :] + names[: r % len(names)]  # A,B,C then B,C,A ...
        rows.append({n: measure(n, model, examples, pad, args, step_tokens) for n in rotated})

    head = ("contender", "steps tok/s", "steps tok/CPU-s", "call tok/s", "fixed s/call", "MFU")
    print("\n{:<10} {:>12} {:>16} {:>11} {:>13} {:>6}".format(*head))
    params = sum(p.numel() for p in model.parameters())
    figures = {}
    for name in names:
        wall, cpu, call, fixed = (statistics.median(row[name][i] for row in rows) for i in range(4))
        # MFU: 6 N tokens/s (forward and backward of every weight, the usual convention, though
        # the frozen base's weight gradients are not computed) over the device's bf16 peak
        mfu = 6 * params * wall / (args.peak_tflops * 1e12) if args.peak_tflops else None
        shown = f"{mfu:.1%}" if mfu is not None else "-"
        print(f"{name:<10} {wall:>12.1f} {cpu:>16.1f} {call:>11.1f} {fixed:>13.2f} {shown:>6}")
        if device.type == "cuda":
            figures[f"{name} tokens per second on {device}"] = {
                "value": wall,
                "unit": "tok/s",
                "goal": None,
                "baseline": f"MFU {shown} (6 N tok/s over {args.peak_tflops} TFLOP/s)",
            }
    ratio_head = ("median ratio", "steps", "CPU", "call", "goal", "per repeat: steps | CPU")
    print("\n{:<16} {:>6} {:>6} {:>6} {:>5}       {}".format(*ratio_head))
    pairs = (("flora", "bare", 0.95), ("flora", "trainer", 1.0), ("packed", "flora", None))
    for ours, other, goal in pairs:
        each = [[row[ours][i] / row[other][i] for row in rows] for i in range(3)]
        wall, cpu, call = (statistics.median(values) for values in each)
        label = {
            "bare": "a bare PEFT + torch loop",
            "trainer": "transformers.Trainer",
            "flora": "flora's padded batches (train.packing = false)",
        }[other]
        key = (
            "packed client training throughput against padded batches"
            if ours == "packed"
            else f"client training throughput against {other}"
        )
        figures[key] = {
            "value": cpu,
            "unit": "x",
            "goal": f">= {goal}" if goal else None,
            "baseline": f"{label}, real tokens per CPU second of the steps",
        }
        verdict = "" if goal is None else "ok" if cpu >= goal else "MISS"
        shown_goal = f"{goal:>5.2f}" if goal else "    -"
        print(
            f"{ours}/{other:<10} {wall:>6.3f} {cpu:>6.3f} {call:>6.3f} {shown_goal} {verdict:<5} "
            + " ".join(f"{x:.2f}" for x in each[0])
            + " | "
            + " ".join(f"{x:.2f}" for x in each[1])
        )

    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
