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
to one category (seed 0). The key comparisons' three seeds run first. A seed fixes the split,
the partition and every init, so runs of one seed see the same data: each comparison is the
paired difference of held-out loss per seed, with a 95% t-interval over the seeds.

Each finished run's config.json, metrics.jsonl and summary.json are copied to
docs/results/study/<run>/ (never a model), so the study can span sittings: a run with a summary
is never run again. The report adds per-category changes, bytes and time to a target loss, and
`flora compare` plots of each group's seed-0 runs (docs/results/study/compare-*/).
"""

from __future__ import annotations

import argparse
import fnmatch
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


KEY = {
    "homogeneous": ("flora", "fedit", "centralized"),
    "heterogeneous": ("flora", "zero-padding", "flexlora", "centralized"),
}
ONCE = {
    "homogeneous": ("ffa-lora", "fedex-lora", "flexlora", "florist"),
    "heterogeneous": ("florist",),
}
# the FLoRA reference code's baselines, defects reproduced (flora.aggregation.reference_*)
DEFECTS = [("homogeneous", "reference-fedit"), ("heterogeneous", "reference-zero-padding")]
ROBUST = [
    ("heterogeneous", m, v) for v in ("sampled30", "shifted") for m in ("flora", "zero-padding")
]


def matrix() -> list[Run]:
    """The key comparisons first, all their seeds (the intervals that the reading rests on), then
    seed 0 of the other views: the defects, robustness and the one-seed methods."""
    key = [Run(s, m, seed) for seed in KEY_SEEDS for s, methods in KEY.items() for m in methods]
    views = [Run(s, m, 0) for s, m in DEFECTS]
    views += [Run(s, m, 0, v) for s, m, v in ROBUST]
    views += [Run(s, m, 0) for s, methods in ONCE.items() for m in methods]
    return key + views


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
    # the one-seed methods against flora (seed 0)
    ("homogeneous", "flora", "ffa-lora", ""),
    ("homogeneous", "flora", "fedex-lora", ""),
    ("homogeneous", "flora", "flexlora", ""),
    ("homogeneous", "flora", "florist", ""),
    ("heterogeneous", "flora", "florist", ""),
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


def run_one(run: Run, out: Path, threads: int, results: Path = RESULTS) -> Path:
    """``run`` (anything with a setting, a name and its overrides) in ``out``, its records kept
    in ``results``."""
    run_dir = out / run.name
    if (run_dir / "summary.json").is_file():
        keep(run_dir, run.name, results)  # finished, perhaps by an earlier sitting
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # unfinished in an earlier sitting: start it again
    config = ROOT / "configs" / "study" / f"{run.setting}.toml"
    command = [
        sys.executable,
        "-m",
        "flora.cli",
        "run",
        str(config),
        "--out",
        str(run_dir),
        "--quiet",
        "--set",
        f"threads={threads}",
    ]
    for item in run.overrides():
        command += ["--set", item]
    subprocess.run(
        command, check=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)}, cwd=ROOT
    )
    keep(run_dir, run.name, results)
    return run_dir


def keep(run_dir: Path, name: str, results: Path = RESULTS) -> None:
    """Copy a finished run's records (never a model) to docs/results/study/<name>/."""
    kept = results / name
    kept.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "metrics.jsonl", "summary.json"):
        shutil.copyfile(run_dir / file, kept / file)


def finished() -> dict[str, dict]:
    """Every committed run's summary, by name."""
    out = {}
    for path in sorted(RESULTS.glob("*/summary.json")):
        out[path.parent.name] = json.loads(path.read_text())
    return out


def records(name: str) -> list[dict]:
    """A committed run's metrics.jsonl rows."""
    text = (RESULTS / name / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def curve(name: str) -> list[tuple[int, float, int, float]]:
    """(round, held-out loss, cumulative MB down, cumulative round seconds) after each round.

    MB down is the traffic recorded by the clients' rows through round t: what crossed by the
    time round t's loss is measured (a client downloads round t's aggregate when round t + 1
    starts, so the last aggregate is not counted, and round 1 carries the initial global LoRA
    of the methods that keep one)."""
    rows = records(name)
    loss = {int(r["round"]): float(r["heldout_loss"]) for r in rows if r.get("kind") == "eval"}
    down: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for r in rows:
        if r.get("kind") == "client":
            down[int(r["round"])] = down.get(int(r["round"]), 0) + int(r.get("bytes_down") or 0)
        if r.get("kind") == "server":
            seconds[int(r["round"])] = float(r.get("round_seconds") or 0.0)
    out = []
    for t in sorted(loss):
        mb = sum(b for u, b in down.items() if u <= t) / 1e6
        out.append((t, loss[t], round(mb), sum(v for u, v in seconds.items() if u <= t)))
    return out


def categories(name: str) -> dict[str, float]:
    """Per category: the final held-out loss minus the base model's (round 0)."""
    evals = [r for r in records(name) if r.get("kind") == "eval" and r.get("per_category")]
    before = next(r for r in evals if r["round"] == 0)["per_category"]
    after = next(r for r in evals if r.get("final"))["per_category"]
    return {k: after[k] - before[k] for k in sorted(after)}


def method_table(done: dict[str, dict]) -> list[str]:
    """Seed 0 of every run (one held-out set, so the rows compare), and each key method's change
    from before, mean over its seeds (each seed holds out other examples: compare means only with
    means)."""
    lines = [
        "| setting | method | seeds | seed 0: held-out loss after | seed 0: change | "
        "change, mean over seeds | MB down (last round) | wall s (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for r in matrix():
        if r.name in done:
            groups.setdefault((r.setting, r.variant, r.method), []).append(r)
    for (setting, variant, method), runs in groups.items():
        summaries = {r.seed: done[r.name] for r in runs}
        first = summaries.get(0)
        zero = f"{first['loss_after']:.4f} | {change(first):+.4f}" if first else "- | -"
        mean = statistics.fmean(change(s) for s in summaries.values())
        mb = statistics.fmean(curve(r.name)[-1][2] for r in runs)
        last = statistics.fmean(curve(r.name)[-1][2] - curve(r.name)[-2][2] for r in runs)
        wall = statistics.fmean(s["seconds"] for s in summaries.values())
        where = f"{setting}, {variant}" if variant else setting
        down = "n/a (one client)" if method == "centralized" else f"{mb:.0f} ({last:.0f})"
        lines.append(
            f"| {where} | {method} | {len(runs)} | {zero} | {mean:+.4f} | {down} | {wall:.0f} |"
        )
    return lines


def change(summary: dict) -> float:
    """A run's held-out loss after minus before: its own base taken out."""
    return float(summary["loss_after"]) - float(summary["loss_before"])


def differences(done: dict[str, dict], setting: str, a: str, b: str, variant: str) -> list[float]:
    """a - b per seed where both ran, on the change from before: equal to the difference of the
    final losses when both runs saw the same base (every pair of one sitting), and free of the
    base's offset when they did not (docs/results.md, "Two installs")."""
    pairs = [
        (done.get(Run(setting, a, s, variant).name), done.get(Run(setting, b, s, variant).name))
        for s in KEY_SEEDS
    ]
    return [change(x) - change(y) for x, y in pairs if x and y]


def paired(done: dict[str, dict]) -> list[tuple[str, list[float]]]:
    """Each comparison with at least one pair: its label and a - b per seed."""
    out = []
    for setting, a, b, variant in COMPARISONS:
        diffs = differences(done, setting, a, b, variant)
        if diffs:
            where = f"{setting[:5]}., {variant}" if variant else f"{setting[:5]}."
            out.append((f"{a} - {b} ({where})", diffs))
    return out


def forest_plot(done: dict[str, dict], path: Path) -> None:
    """Every comparison: each seed's paired difference (dots) and the mean with its 95%
    interval (bar; a comparison of one seed shows its dot alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = paired(done)
    if not rows:
        return
    figure = Figure(figsize=(9, 0.45 * len(rows) + 1.4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for y, (_, diffs) in enumerate(reversed(rows)):
        mean, low, high = paired_interval(diffs)
        if not math.isnan(low):
            axes.plot([low, high], [y, y], color="tab:blue", linewidth=2)
        axes.plot([mean], [y], marker="D", color="tab:blue")
        axes.plot(diffs, [y] * len(diffs), "o", color="tab:gray", alpha=0.6, markersize=4)
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    axes.set_xlabel("difference of the change of held-out loss, a - b (negative: a better)")
    axes.set_title("a - b per seed (dots); mean and 95% t-interval (bar)", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def comparison_table(done: dict[str, dict]) -> list[str]:
    lines = [
        "| setting | comparison (a - b, change of held-out loss) | seeds | mean | "
        "95% interval | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for setting, a, b, variant in COMPARISONS:
        diffs = differences(done, setting, a, b, variant)
        if not diffs:
            continue
        mean, low, high = paired_interval(diffs)
        interval = "n/a (one seed)" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"
        where = f"{setting}, {variant}" if variant else setting
        each = ", ".join(f"{d:+.4f}" for d in diffs)
        lines.append(f"| {where} | {a} - {b} | {len(diffs)} | {mean:+.4f} | {interval} | {each} |")
    return lines


def category_table(done: dict[str, dict], setting: str) -> list[str]:
    """Per category, each method's change of held-out loss at seed 0 (one held-out set)."""
    runs: dict[str, list[str]] = {}
    for r in matrix():
        if r.setting == setting and not r.variant and r.seed == 0 and r.name in done:
            runs.setdefault(r.method, []).append(r.name)
    if not runs:
        return []
    changes = {m: [categories(n) for n in names] for m, names in runs.items()}
    names = sorted(next(iter(changes.values()))[0])
    lines = [
        f"| {setting}: category | " + " | ".join(changes) + " |",
        "|---|" + "---|" * len(changes),
    ]
    for category in names:
        cells = [f"{statistics.fmean(c[category] for c in cs):+.4f}" for cs in changes.values()]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines


def target_table(done: dict[str, dict]) -> list[str]:
    """Bytes and wall time until the held-out loss first reaches a target (seed 0).

    The target, per setting and variant: halfway from the base model's loss to the best final
    loss of a federated run of seed 0 there; read at the rounds' evaluations (no interpolation).
    """
    lines = [
        "| setting | target loss | method | reached after round | MB down | wall s |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in matrix():
        if r.seed == 0 and r.method != "centralized" and r.name in done:
            groups.setdefault((r.setting, r.variant), []).append(r)
    for (setting, variant), runs in groups.items():
        curves = {r.method: curve(r.name) for r in runs}
        base = next(iter(curves.values()))[0][1]
        target = base - 0.5 * (base - min(c[-1][1] for c in curves.values()))
        where = f"{setting}, {variant}" if variant else setting
        for method, points in curves.items():
            hit = next((p for p in points if p[0] > 0 and p[1] <= target), None)
            cells = f"{hit[0]} | {hit[2]} | {hit[3]:.0f}" if hit else "not reached | - | -"
            lines.append(f"| {where} | {target:.4f} | {method} | {cells} |")
    return lines


MMLU = ["--tasks", "mmlu", "--limit-per-subject", "10", "--shots", "0", "--quiet"]
MMLU_RUNS = [Run(s, m, 0) for s, methods in KEY.items() for m in methods]  # seed 0's key runs


def mmlu(out: Path, threads: int) -> None:
    """0-shot MMLU, 10 questions a subject (570), of the base model and of each finished seed-0
    key run's final model: RESULTS/<run>/eval/eval.json (where `flora compare` reads it) and
    RESULTS/base-model/eval/eval.json. Resumable: a model with an eval.json is not scored again."""
    todo = [("base-model", "smollm2")]
    todo += [
        (r.name, str(out / r.name)) for r in MMLU_RUNS if (out / r.name / "summary.json").is_file()
    ]
    for name, model in todo:
        kept = RESULTS / name / "eval" / "eval.json"
        if kept.is_file():
            continue
        where = out / name / "eval"
        command = [
            sys.executable,
            "-m",
            "flora.cli",
            "eval",
            model,
            *MMLU,
            "--out",
            str(where),
            "--threads",
            str(threads),
        ]
        subprocess.run(
            command, check=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": str(threads)}
        )
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(where / "eval.json", kept)


def mmlu_table() -> list[str]:
    """MMLU (weighted, with its standard error) at the start (the base) and the end of each run."""

    def read(name: str) -> tuple[float, float] | None:
        path = RESULTS / name / "eval" / "eval.json"
        if not path.is_file():
            return None
        result = json.loads(path.read_text())["results"]["mmlu"]
        return 100 * result["acc,none"], 100 * result["acc_stderr,none"]

    base = read("base-model")
    if base is None:
        return []

    def cell(score: tuple[float, float]) -> str:
        low, high = score[0] - 1.96 * score[1], score[0] + 1.96 * score[1]
        return f"{score[0]:.1f} +- {score[1]:.1f} [{low:.1f}, {high:.1f}]"

    lines = [
        "| model | MMLU 0-shot, 570 questions (%): mean +- standard error [95% interval] | "
        "change from the base (points) |",
        "|---|---|---|",
        f"| base SmolLM2-135M-Instruct | {cell(base)} | |",
    ]
    for run in MMLU_RUNS:
        score = read(run.name)
        if score:
            lines.append(f"| {run.name} | {cell(score)} | {score[0] - base[0]:+.1f} |")
        else:
            lines.append(f"| {run.name} | not scored (its model was not kept) | |")
    return lines


def report() -> str:
    done = finished()
    parts = [
        method_table(done),
        comparison_table(done),
        category_table(done, "homogeneous"),
        category_table(done, "heterogeneous"),
        target_table(done),
        mmlu_table(),
    ]
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"


def plots() -> None:
    """`flora compare` of each group's seed-0 runs: docs/results/study/compare-<group>/."""
    done = finished()
    groups = {
        "homogeneous": [r for r in matrix() if r.setting == "homogeneous" and not r.variant],
        "heterogeneous": [r for r in matrix() if r.setting == "heterogeneous" and not r.variant],
        "robustness": [
            r
            for r in matrix()
            if r.variant or (r.setting == "heterogeneous" and r.method in ("flora", "zero-padding"))
        ],
    }
    for group, runs in groups.items():
        labels = [
            f"{r.method}{'-' + r.variant if r.variant else ''}={RESULTS / r.name}"
            for r in runs
            if r.seed == 0 and r.name in done
        ]
        if len(labels) < 2:
            continue
        command = [
            sys.executable,
            "-m",
            "flora.cli",
            "compare",
            "--out",
            str(RESULTS / f"compare-{group}"),
        ]
        for label in labels:
            command += ["--label", label]
        subprocess.run(command, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (1 thread each)")
    parser.add_argument("--max-runs", type=int, default=0, help="at most this many (0: all)")
    parser.add_argument("--report", action="store_true", help="only the tables")
    parser.add_argument("--mmlu", action="store_true", help="only MMLU of the base and the runs")
    parser.add_argument(
        "--part",
        choices=("main", "splits"),
        default="main",
        help="splits: the split sweep "
        "(scripts/splits.py: the same local steps in more or fewer rounds)",
    )
    parser.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="METHOD",
        help="with --part splits: a registered method that joins the sweep (repeatable)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="with --part splits: only the runs whose name matches (repeatable; e.g. '*-9x1-*')",
    )
    args = parser.parse_args(argv)
    if args.part == "splits":
        return _splits(args)
    if args.mmlu:
        mmlu(args.out, 1 if args.jobs > 1 else 2)
    elif not args.report:
        todo = [r for r in matrix() if not (RESULTS / r.name / "summary.json").is_file()]
        todo = todo[: args.max_runs] if args.max_runs else todo
        threads = 1 if args.jobs > 1 else 2
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda run: run_one(run, args.out, threads), todo))
    text = report()
    (RESULTS / "tables.md").parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tables.md").write_text(text)
    forest_plot(finished(), RESULTS / "comparisons.png")
    print(text)
    plots()
    return 0


def _splits(args: argparse.Namespace) -> int:
    """The split sweep: its runs (resumable, records in docs/results/splits/), its tables and
    its Pareto plot."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import splits

    if not args.report:
        todo = [
            r
            for r in splits.matrix(args.add)
            if not (splits.RESULTS / r.name / "summary.json").is_file()
            and (not args.only or any(fnmatch.fnmatch(r.name, glob) for glob in args.only))
        ]
        todo = todo[: args.max_runs] if args.max_runs else todo
        threads = 1 if args.jobs > 1 else 2
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda r: run_one(r, args.out, threads, splits.RESULTS), todo))
    splits.RESULTS.mkdir(parents=True, exist_ok=True)
    text = splits.report()
    (splits.RESULTS / "tables.md").write_text(text)
    if splits.finished():
        splits.pareto_plot(splits.RESULTS / "pareto.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
