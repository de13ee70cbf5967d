"""docs/privacy.md's measured table: flora, ffa-lora and fedit at epsilon = inf, 8 and 2.

    python scripts/privacy_study.py [--jobs 2] [--out runs/privacy-study]

Every run is ``flora run configs/study/privacy.toml`` with the method and the privacy settings
set on the command line (epsilon = inf: privacy.mode = "none", flora's ordinary training). A
finished run (its summary.json) is kept, so the script resumes run by run. Each run's
metrics.jsonl and summary.json go to docs/results/privacy/<run>/ (never the model), and the table
replaces the block between the markers in docs/privacy.md. The speed cost of DP-SGD is the ratio
of training seconds per token against the same method's non-private run, measured in this one
sitting on this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "study" / "privacy.toml"
RESULTS = ROOT / "docs" / "results" / "privacy"
DOC = ROOT / "docs" / "privacy.md"
BEGIN, END = "<!-- privacy-table: begin -->", "<!-- privacy-table: end -->"
METHODS = ("flora", "ffa-lora", "fedit")
EPSILONS = (math.inf, 8.0, 2.0)
# FFA-LoRA against FedIT under DP (its paper's claim), paired by seed: seeds 1 and 2 besides 0
SEEDED = (("ffa-lora", 8.0), ("fedit", 8.0))
SEEDS = (0, 1, 2)
T95 = {1: 12.706, 2: 4.303}  # Student's t, two-sided 95%, by degrees of freedom


def name(method: str, epsilon: float, seed: int = 0) -> str:
    tail = f"-seed{seed}" if seed else ""
    return f"{method}-eps-{'inf' if math.isinf(epsilon) else f'{epsilon:g}'}{tail}"


def overrides(method: str, epsilon: float, seed: int = 0) -> list[str]:
    sets = [f"federation.method='{method}'", f"seed={seed}"]
    if not math.isinf(epsilon):
        sets += ["privacy.mode='dp-sgd'", f"privacy.epsilon={epsilon}"]
    return sets


def run_one(out: Path, method: str, epsilon: float, seed: int, threads: int) -> Path:
    run_dir = out / name(method, epsilon, seed)
    if (run_dir / "summary.json").is_file():
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run from an earlier sitting: start it again
    command = [
        sys.executable,
        "-m",
        "flora.cli",
        "run",
        str(CONFIG),
        "--out",
        str(run_dir),
        "--quiet",
        "--set",
        f"threads={threads}",
    ]
    for item in overrides(method, epsilon, seed):
        command += ["--set", item]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return run_dir


def measure(run_dir: Path) -> dict[str, float | int | str | None]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    clients = [r for r in rows if r["kind"] == "client"]
    last = max(r["round"] for r in clients)
    spent = [r.get("epsilon") for r in clients if r["round"] == last]
    seconds, tokens = sum(r["seconds"] for r in clients), sum(r["tokens"] for r in clients)
    return {
        "loss_before": summary["loss_before"],
        "loss_after": summary["loss_after"],
        "tokens": tokens,
        "train_seconds": seconds,
        "seconds_per_ktoken": 1000 * seconds / tokens,
        "epsilon_spent": max((e for e in spent if e is not None), default=None),
        "noise_multiplier": max((r.get("noise_multiplier") or 0 for r in clients), default=0),
    }


def table(results: dict[str, dict]) -> str:
    lines = [
        "| method | epsilon (target) | epsilon spent (max over clients) | noise multiplier | "
        "held-out loss before | after | change | training tokens | s per token / non-private |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for method in METHODS:
        base = results[name(method, math.inf)]
        for epsilon in EPSILONS:
            r = results[name(method, epsilon)]
            ratio = r["seconds_per_ktoken"] / base["seconds_per_ktoken"]
            if not math.isinf(epsilon):
                ratios.append(ratio)
            spent = "n/a" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
            lines.append(
                f"| {method} | {'inf (no DP)' if math.isinf(epsilon) else f'{epsilon:g}'} | "
                f"{spent} | {r['noise_multiplier']:.3f} | {r['loss_before']:.4f} | "
                f"{r['loss_after']:.4f} | {r['loss_after'] - r['loss_before']:+.4f} | "
                f"{r['tokens']:,} | {'1 (baseline)' if math.isinf(epsilon) else f'{ratio:.2f}x'} |"
            )
    lines.append("")
    diffs = [
        results[name("ffa-lora", 8.0, seed)]["loss_after"]
        - results[name("fedit", 8.0, seed)]["loss_after"]
        for seed in SEEDS
    ]
    mean = statistics.fmean(diffs)
    half = T95[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    lines.append(
        f"FFA-LoRA - FedIT at epsilon = 8, held-out loss after, paired by seed "
        f"({len(diffs)} seeds: {', '.join(f'{d:+.4f}' for d in diffs)}): mean "
        f"{mean:+.4f}, 95% interval [{mean - half:+.4f}, "
        f"{mean + half:+.4f}]."
    )
    lines.append("")
    lines.append(
        f"Median over the six private runs of training seconds per token against the "
        f"same method's non-private run: {statistics.median(ratios):.2f}x (runs two at "
        "a time on a shared machine: indicative; bench/dp_sgd.py measures it "
        "interleaved)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "privacy-study")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (1 thread each)")
    args = parser.parse_args(argv)
    jobs = [(m, e, 0) for e in EPSILONS for m in METHODS]
    jobs += [(m, e, seed) for seed in SEEDS[1:] for m, e in SEEDED]
    threads = 1 if args.jobs > 1 else 2
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = list(pool.map(lambda job: run_one(args.out, *job, threads), jobs))
    results = {}
    for (method, epsilon, seed), run_dir in zip(jobs, dirs, strict=True):
        results[name(method, epsilon, seed)] = measure(run_dir)
        keep = RESULTS / name(method, epsilon, seed)
        keep.mkdir(parents=True, exist_ok=True)
        for file in ("metrics.jsonl", "summary.json"):
            shutil.copyfile(run_dir / file, keep / file)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    print(text)
    doc = DOC.read_text()
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
