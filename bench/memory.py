"""Peak memory: of the embedded runtime against the number of simulated clients K, then of one
client's training per setting (gradient checkpointing, a bf16 base, a 4-bit base) as ratios to
the fp32 run (bench/memory_settings.py).

Part 1, K:
For K = 2, 5, 10 (--ks), each in a fresh subprocess, runs `flora.simulation.run` for one model:
- tiny: configs/tiny.toml (tiny random Llama), K clients with ranks cycling [8, 4, 2],
  eval.samples=0;
- smollm2: configs/default.toml (SmolLM2-135M) with tiny budgets: K clients with the first K
  hetero-10 ranks, rounds=1, train.max_steps=1, data.limit=300, data.heldout=8, eval.samples=0.
It reports the process's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, MiB) at three
points: when the first client starts training (model, data, the held-out loss before), after the
first round (all K clients trained and aggregated: a wrapper on flora.outputs.save_checkpoint)
and at the end (held-out loss after, final model saved), and the final peak's ratio to K=2's.
The baseline is K=2; the goal is flat memory: ratio ~1.0
(the simulator shares one base model and removes each client's LoRA after training).

    .venv/bin/python bench/memory.py                  # both parts, ~7 min
    .venv/bin/python bench/memory.py --part settings  # part 2 only
    .venv/bin/python bench/memory.py --models tiny --ks 2 10   # quick look
    .venv/bin/python bench/memory.py --threads 1   # faster on a 2-core machine shared with others
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HETERO = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]


def overrides(model: str, k: int) -> tuple[str, list[str]]:
    common = [f"federation.num_clients={k}", "eval.samples=0"]
    if model == "tiny":
        return "configs/tiny.toml", [*common, f"lora.ranks={[[8, 4, 2][i % 3] for i in range(k)]}"]
    budgets = ["federation.rounds=1", "train.max_steps=1", "data.limit=300", "data.heldout=8"]
    ranks = [HETERO[i % len(HETERO)] for i in range(k)]
    return "configs/default.toml", [*common, f"lora.ranks={ranks}", *budgets]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(model: str, k: int, threads: int) -> dict[str, Any]:
    import torch

    import flora.client
    import flora.outputs
    import flora.simulation
    from flora.config import load_config

    if threads:
        torch.set_num_threads(threads)
    stages: dict[str, float] = {}  # peak when a stage is first reached
    train_client, save_checkpoint = flora.client.train_client, flora.outputs.save_checkpoint

    def before_training(*args: Any, **kwargs: Any) -> Any:
        stages.setdefault("before_train", peak_mib())  # model, data, sketches, first eval
        return train_client(*args, **kwargs)

    def after_round(*args: Any, **kwargs: Any) -> Any:
        stages.setdefault("after_round", peak_mib())  # all K clients trained and aggregated
        return save_checkpoint(*args, **kwargs)

    flora.client.train_client = before_training  # type: ignore[assignment]
    flora.outputs.save_checkpoint = after_round  # type: ignore[assignment]
    path, sets = overrides(model, k)
    with tempfile.TemporaryDirectory() as tmp:
        flora.simulation.run(load_config(path, sets), Path(tmp) / "run", quiet=True)
    return {"model": model, "k": k, **stages, "peak": peak_mib()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 5, 10])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--part", choices=["all", "k", "settings"], default="all")
    parser.add_argument("--length", type=int, default=512, help="part 2: tokens per example")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write the figures here (make bench)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.threads)))
        return
    figures: dict[str, dict[str, object]] = {}
    if args.part in ("all", "k"):
        figures |= by_k(args)
    if args.part in ("all", "settings"):
        sys.path.insert(0, str(Path(__file__).parent))
        import memory_settings

        print()
        rows = memory_settings.measure(list(memory_settings.SETTINGS), args.length, args.threads)
        memory_settings.report(rows, args.length)
        figures |= memory_settings.figures(rows)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def by_k(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    print(
        f"{'model':<8} {'K':>3} {'before train':>13} {'after round 1':>13} {'peak MiB':>9} "
        f"{'peak / K=' + str(args.ks[0]):>10}"
    )
    figures: dict[str, dict[str, object]] = {}
    for model in args.models:
        base = None
        for k in args.ks:
            command = [sys.executable, __file__, "--worker", model, str(k)]
            out = subprocess.run(
                [*command, "--threads", str(args.threads)],
                check=True,
                capture_output=True,
                text=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or row["peak"]
            print(
                f"{model:<8} {k:>3} {row['before_train']:>13.0f} {row['after_round']:>13.0f} "
                f"{row['peak']:>9.0f} {row['peak'] / base:>10.3f}",
                flush=True,
            )
            if k == args.ks[-1] and k != args.ks[0]:
                figures[f"{model} peak memory at K = {k}"] = {
                    "value": row["peak"] / base,
                    "unit": "x",
                    "goal": "flat in K",
                    "baseline": f"the same run with K = {args.ks[0]} clients",
                }
    return figures


if __name__ == "__main__":
    main()
