"""The method comparison of docs/results.md: every run, resumable, and its paired differences.

    python scripts/study.py --jobs 2                 # every run not yet finished, two side by side
    python scripts/study.py --jobs 2 --max-runs 4    # four more runs (one sitting's worth)
    python scripts/study.py --report                 # the tables from the finished runs only

Settings (configs/study/homogeneous.toml and heterogeneous.toml): SmolLM2-135M-Instruct, Dolly
with the truncation that keeps answers, 10 clients over a Dirichlet(0.5) split by category, LoRA
on q and v, 3 rounds of 3 local steps of batch 4 at max_length 128 (held-out loss on 120
examples after every round). The centralized baseline trains one client of the largest rank on
all the training data for 3 x 10 steps a round: the same training examples as the federation,
not the same number of steps. (The issue's first sizing, 10 local steps at max_length 256, costs
about 100 minutes a run here, not 16: a SmolLM2 training example of ~200 tokens takes ~3 s on one
thread of this CPU.)

Runs: homogeneous r = 16 (flora, fedit, centralized: seeds 0, 1, 2; ffa-lora, fedex-lora,
flexlora, florist: seed 0), heterogeneous [64, 32, 16, 16, 8, 8, 4, 4, 4, 4] (flora,
zero-padding, flexlora, centralized: seeds 0, 1, 2; florist: seed 0); the FLoRA reference code's
baselines with their defects (reference-fedit, reference-zero-padding: seed 0); robustness,
heterogeneous flora and zero-padding with 30% of the clients a round and with client 0 shifted
to one category (seed 0). Seed 0 of everything runs first. A seed fixes the split,
the partition and every init, so runs of one seed see the same data: each comparison is the
paired difference of held-out loss per seed, with a 95% t-interval over the seeds.

Each finished run's config.json, metrics.jsonl and summary.json are copied to docs/results/study/<run>/
(never a model), so the study can span sittings: a run with a summary is never run again.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "study"
KEY_SEEDS, ONE_SEED = (0, 1, 2), (0,)
STEPS, CLIENTS = 3, 10  # configs/study/*.toml: train.max_steps, federation.num_clients


VARIANTS = {  # robustness: the same comparison under a harder federation
    "": [],
    "sampled30": ["federation.fraction=0.3"],  # 3 of the 10 clients a round
    "shifted": ["data.shift_client=0", "data.shift_category='brainstorming'"],  # one specialist
}


@dataclass(frozen=True)
class Run:
    setting: str  # "homogeneous" or "heterogeneous"
    method: str  # an aggregation method, or "centralized"
    seed: int
    variant: str = ""  # a key of VARIANTS

    @property
    def name(self) -> str:
        variant = f"-{self.variant}" if self.variant else ""
        return f"{self.setting[:5]}-{self.method}{variant}-seed{self.seed}"

    def overrides(self) -> list[str]:
        sets = [f"seed={self.seed}", *VARIANTS[self.variant]]
        if self.method == "centralized":
            sets += ["federation.centralized=true", f"train.max_steps={STEPS * CLIENTS}"]
        else:
            sets += [f"federation.method='{self.method}'"]
        return sets


KEY = {"homogeneous": ("flora", "fedit", "centralized"),
       "heterogeneous": ("flora", "zero-padding", "flexlora", "centralized")}  # fmt: skip
ONCE = {"homogeneous": ("ffa-lora", "fedex-lora", "flexlora", "florist"),
        "heterogeneous": ("florist",)}  # fmt: skip
# the FLoRA reference code's baselines, defects reproduced (flora.aggregation.reference_*)
DEFECTS = [("homogeneous", "reference-fedit"), ("heterogeneous", "reference-zero-padding")]
ROBUST = [("heterogeneous", m, v) for v in ("sampled30", "shifted")
          for m in ("flora", "zero-padding")]  # fmt: skip


def matrix() -> list[Run]:
    """Seed 0 of every view first (key methods, defects, robustness, the one-seed methods), then
    the key comparisons' seeds 1 and 2: a sitting that stops early has one seed of everything."""
    first = [Run(s, m, 0) for s, methods in KEY.items() for m in methods]
    first += [Run(s, m, 0) for s, m in DEFECTS]
    first += [Run(s, m, 0, v) for s, m, v in ROBUST]
    first += [Run(s, m, 0) for s, methods in ONCE.items() for m in methods]
    later = [Run(s, m, seed) for seed in KEY_SEEDS[1:] for s, methods in KEY.items()
             for m in methods]  # fmt: skip
    return first + later


COMPARISONS = [  # (setting, a, b, variant): a - b per seed
    ("homogeneous", "flora", "fedit", ""),
    ("homogeneous", "flora", "centralized", ""),
    ("heterogeneous", "flora", "zero-padding", ""),
    ("heterogeneous", "flora", "flexlora", ""),
    ("heterogeneous", "flora", "centralized", ""),
    ("homogeneous", "reference-fedit", "fedit", ""),
    ("heterogeneous", "reference-zero-padding", "zero-padding", ""),
    ("heterogeneous", "flora", "zero-padding", "sampled30"),
    ("heterogeneous", "flora", "zero-padding", "shifted"),
]


# two-sided 95% quantiles of Student's t for n - 1 degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences and its 95% t-interval (nan bounds for one pair)."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, math.nan, math.nan
    half = T95[len(differences) - 1] * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def run_one(run: Run, out: Path, threads: int) -> Path:
    run_dir = out / run.name
    if (run_dir / "summary.json").is_file():
        keep(run_dir, run.name)  # finished, perhaps by an earlier sitting that stopped before
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # unfinished in an earlier sitting: start it again
    config = ROOT / "configs" / "study" / f"{run.setting}.toml"
    command = [sys.executable, "-m", "flora.cli", "run", str(config), "--out", str(run_dir),
               "--quiet", "--set", f"threads={threads}"]  # fmt: skip
    for item in run.overrides():
        command += ["--set", item]
    subprocess.run(command, check=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)},
                   cwd=ROOT)  # fmt: skip
    keep(run_dir, run.name)
    return run_dir


def keep(run_dir: Path, name: str) -> None:
    """Copy a finished run's records (never a model) to docs/results/study/<name>/."""
    kept = RESULTS / name
    kept.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "metrics.jsonl", "summary.json"):
        shutil.copyfile(run_dir / file, kept / file)


def finished() -> dict[str, dict]:
    """Every committed run's summary, by name."""
    out = {}
    for path in sorted(RESULTS.glob("*/summary.json")):
        out[path.parent.name] = json.loads(path.read_text())
    return out


def report() -> str:
    done = finished()
    lines = ["| setting | method | seeds | held-out loss after (mean) | change from before |",
             "|---|---|---|---|---|"]  # fmt: skip
    for setting in ("homogeneous", "heterogeneous"):
        methods = sorted({r.method for r in matrix() if r.setting == setting})
        for method in methods:
            runs = [done[r.name] for r in matrix() if (r.setting, r.method) == (setting, method)
                    and r.name in done]  # fmt: skip
            if not runs:
                continue
            after = statistics.fmean(s["loss_after"] for s in runs)
            change = statistics.fmean(s["loss_after"] - s["loss_before"] for s in runs)
            lines.append(f"| {setting} | {method} | {len(runs)} | {after:.4f} | {change:+.4f} |")
    lines += ["", "| setting | comparison (a - b, held-out loss) | seeds | mean | 95% interval |",
              "|---|---|---|---|---|"]  # fmt: skip
    for setting, a, b, variant in COMPARISONS:
        pairs = [(done.get(Run(setting, a, s, variant).name),
                  done.get(Run(setting, b, s, variant).name)) for s in KEY_SEEDS]  # fmt: skip
        diffs = [x["loss_after"] - y["loss_after"] for x, y in pairs if x and y]
        if not diffs:
            continue
        mean, low, high = paired_interval(diffs)
        interval = "n/a (one seed)" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"
        where = f"{setting}, {variant}" if variant else setting
        lines.append(f"| {where} | {a} - {b} | {len(diffs)} | {mean:+.4f} | {interval} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (1 thread each)")
    parser.add_argument("--max-runs", type=int, default=0, help="at most this many (0: all)")
    parser.add_argument("--report", action="store_true", help="only the tables")
    args = parser.parse_args(argv)
    if not args.report:
        todo = [r for r in matrix() if not (RESULTS / r.name / "summary.json").is_file()]
        todo = todo[: args.max_runs] if args.max_runs else todo
        threads = 1 if args.jobs > 1 else 2
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda run: run_one(run, args.out, threads), todo))
    text = report()
    (RESULTS / "tables.md").parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
