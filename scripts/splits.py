"""The split sweep (issue 23): the same local steps per client, split into more or fewer rounds.

    python scripts/study.py --part splits --jobs 2           # every sweep run not yet finished
    python scripts/study.py --part splits --jobs 2 --max-runs 4
    python scripts/study.py --part splits --add flora-xyz    # a later method joins the sweep
                                   # (an equal-rank method joins the homogeneous setting only)
    python scripts/study.py --part splits --report           # the tables and the Pareto plot

Hypothesis under test: FLoRA's gap to FedIT shrinks as the steps per round grow (a fresh LoRA,
B = 0, spends a short round growing B), and flora-warm closes it at every split. Every run has
9 local steps per client in all (batch 4, the study's configs otherwise): 9 rounds x 1 step,
3 x 3 and 1 x 9; held-out loss before and after only (the eval is the same at every split).
Homogeneous r = 16: flora, fedit, flora-warm (budget 32: 16 for the warm init, 16 for the
update), its two ablations (warm only: budget 0; bounded only: warm = false, budget 32);
heterogeneous ranks: flora, flexlora, zero-padding, flora-warm (budget 128). Seeds 0, 1, 2 at the
two extreme splits and seed 0 at 3 x 3, the extremes' seeds first. flora-warm's int8 downlink
(homogeneous) runs where it sends anything: at 9 x 1 (three seeds) and 3 x 3 (seed 0). Records
(never models) go to docs/results/splits/<run>/; a run with a summary is never run again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "splits"
TOTAL = 9  # local steps per client in all
SPLITS = ((9, 1), (3, 3), (1, 9))  # (rounds, steps a round)
EXTREMES = ((9, 1), (1, 9))

# name -> (method, its options): the ablations are flora-warm with one part switched off
VARIANTS = {
    "flora": ("flora", []),
    "fedit": ("fedit", []),
    "flexlora": ("flexlora", []),
    "zero-padding": ("zero-padding", []),
    "flora-warm": ("flora-warm", ["federation.options.budget={budget}"]),
    "warm-only": ("flora-warm", ["federation.options.budget=0"]),
    "bounded-only": (
        "flora-warm",
        ["federation.options.budget={budget}", "federation.options.warm=false"],
    ),
    "warm-int8": (
        "flora-warm",
        ["federation.options.budget={budget}", "federation.options.downlink='int8'"],
    ),
    # FedMomentum with its kept components as U S and Vh (flora-warm's form) instead of the
    # balanced split: does the split explain its loss? (--add momentum-svd)
    "momentum-svd": ("fedmomentum", ["federation.options.split='svd'"]),
}
# variants that differ from another only in what travels: run at the splits of several rounds
SEVERAL_ROUNDS = {"homogeneous": ["warm-int8"], "heterogeneous": []}
METHODS = {
    "homogeneous": ["flora", "fedit", "flora-warm", "warm-only", "bounded-only"],
    "heterogeneous": ["flora", "flexlora", "zero-padding", "flora-warm"],
}
BASELINE = {"homogeneous": "fedit", "heterogeneous": "flexlora"}  # the pairs of an added one
BUDGET = {"homogeneous": 32, "heterogeneous": 128}  # ranks of (o + i) a client a round
# fp32 bytes of one rank of (o + i) over SmolLM2-135M's targets: 30 layers of q_proj (576 x 576)
# and v_proj (192 x 576)
RANK_BYTES = 4 * 30 * ((576 + 576) + (192 + 576))


@dataclass(frozen=True)
class SplitRun:
    setting: str
    variant: str  # a key of VARIANTS, or a registered method's name (--add)
    rounds: int
    seed: int

    @property
    def steps(self) -> int:
        return TOTAL // self.rounds

    @property
    def name(self) -> str:
        return f"{self.setting[:5]}-{self.variant}-{self.rounds}x{self.steps}-seed{self.seed}"

    def overrides(self) -> list[str]:
        method, options = VARIANTS.get(self.variant, (self.variant, []))
        sets = [
            f"seed={self.seed}",
            f"federation.method='{method}'",
            f"federation.rounds={self.rounds}",
            f"train.max_steps={self.steps}",
            "eval.every=0",
        ]
        return sets + [o.format(budget=BUDGET[self.setting]) for o in options]


def matrix(added: Sequence[str] = ()) -> list[SplitRun]:
    """The extremes' three seeds first, then seed 0 at the middle split; the downlink variants
    at 9 x 1 (three seeds) and 3 x 3 (seed 0); an ``added`` method of equal ranks only joins
    the homogeneous setting."""
    from flora.aggregation import get_method

    methods = {s: list(m) for s, m in METHODS.items()}
    for name in added:
        mixed = get_method(VARIANTS.get(name, (name, []))[0]).mixed_ranks
        for setting in ("homogeneous", "heterogeneous") if mixed else ("homogeneous",):
            methods[setting].append(name)
    runs = [
        SplitRun(setting, v, rounds, seed)
        for seed in (0, 1, 2)
        for rounds, _ in EXTREMES
        for setting, variants in methods.items()
        for v in variants
    ]
    runs += [SplitRun(s, v, 3, 0) for s, variants in methods.items() for v in variants]
    runs += [
        SplitRun(s, v, rounds, seed)
        for s, variants in SEVERAL_ROUNDS.items()
        for v in variants
        for rounds, seed in ((9, 0), (9, 1), (9, 2), (3, 0))
    ]
    return runs


def variants(setting: str, done: set[str]) -> list[str]:
    """The sweep's variants of ``setting``, then any other whose runs are among ``done``."""
    found = [*METHODS[setting], *SEVERAL_ROUNDS[setting]]
    prefix = setting[:5] + "-"
    for name in sorted(done):
        if name.startswith(prefix):
            variant = name[len(prefix) :].rsplit("-", 2)[0]
            if variant not in found:
                found.append(variant)
    return found


def _rows(name: str) -> list[dict]:
    path = RESULTS / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def outcome(name: str) -> tuple[float, float, int]:
    """(held-out loss change, MB downloaded in all by the clients, the largest bytes one
    client downloaded in one round) of a finished run."""
    rows = _rows(name)
    evals = [r for r in rows if r["kind"] == "eval"]
    clients = [r for r in rows if r["kind"] == "client"]
    change = evals[-1]["heldout_loss"] - evals[0]["heldout_loss"]
    return (
        change,
        sum(r["bytes_down"] for r in clients) / 1e6,
        max(r["bytes_down"] for r in clients),
    )


def _budget(name: str) -> int | None:
    """The bytes a client may download a round in run ``name`` (None: no budget)."""
    config = json.loads((RESULTS / name / "config.json").read_text())
    budget = config["federation"].get("options", {}).get("budget", 0)
    return budget * RANK_BYTES if budget else None


def finished() -> list[str]:
    return sorted(p.parent.name for p in RESULTS.glob("*/summary.json"))


def _interval(values: list[float]) -> str:
    t95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:+.4f} (n = 1)"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = t95[len(values) - 1] * sd / math.sqrt(len(values))
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] (n = {len(values)})"


PAIRS = [  # (setting, a, b): a - b of the held-out loss change, paired by seed, at each split
    ("homogeneous", "flora", "fedit"),
    ("homogeneous", "flora-warm", "fedit"),
    ("homogeneous", "flora-warm", "flora"),
    ("homogeneous", "warm-only", "flora"),
    ("homogeneous", "bounded-only", "flora"),
    ("heterogeneous", "flora", "flexlora"),
    ("heterogeneous", "flora-warm", "flexlora"),
    ("heterogeneous", "flora-warm", "flora"),
    ("heterogeneous", "flora", "zero-padding"),
    # later questions: does FedMomentum's split explain its loss?
    ("homogeneous", "momentum-svd", "fedmomentum"),
]


def report() -> str:
    done = set(finished())
    lines = [
        "# The split sweep (scripts/splits.py)",
        "",
        f"{len(done)} runs finished ({len(matrix())} in the sweep's own matrix). Held-out loss "
        "change (after - before; lower is better), MB downloaded by all clients in all rounds, "
        "and the largest download of one client in one round.",
        "",
        "| run | loss change | MB down (all) | max one client-round (MB) | budget (MB) |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(done):
        change, mb, most = outcome(name)
        budget = _budget(name)
        within = (
            ""
            if budget is None
            else f"{budget / 1e6:.2f} ({'kept' if most <= budget else 'EXCEEDED'})"
        )
        lines.append(f"| {name} | {change:+.4f} | {mb:.1f} | {most / 1e6:.2f} | {within} |")
    lines += [
        "",
        "Paired differences (a - b; 95% t-interval over seeds):",
        "",
        "| setting | a - b | split | difference |",
        "|---|---|---|---|",
    ]
    extra = [
        (setting, v, against)
        for setting in METHODS
        for v in variants(setting, done)
        if v not in METHODS[setting]
        for against in (BASELINE[setting], "flora", "flora-warm")
    ]
    for setting, a, b in PAIRS + extra:
        for rounds, steps in SPLITS:
            diffs = []
            for seed in (0, 1, 2):
                ra, rb = (SplitRun(setting, v, rounds, seed).name for v in (a, b))
                if ra in done and rb in done:
                    diffs.append(outcome(ra)[0] - outcome(rb)[0])
            if diffs:
                lines.append(f"| {setting} | {a} - {b} | {rounds}x{steps} | {_interval(diffs)} |")
    return "\n".join(lines + bytes_to_target(done)) + "\n"


def _cells(setting: str, done: set[str]) -> dict[tuple[str, int], tuple[float, float]]:
    """(variant, rounds) -> (held-out loss change, MB down) of seed 0's finished runs of
    several rounds: every cell has seed 0 (the middle split has no other), and one round
    delivers nothing after it, so its bytes compare with nothing."""
    cells = {}
    for variant in variants(setting, done):
        for rounds, _ in SPLITS:
            name = SplitRun(setting, variant, rounds, 0).name
            if rounds > 1 and name in done:
                cells[variant, rounds] = outcome(name)[:2]
    return cells


def bytes_to_target(done: set[str]) -> list[str]:
    """For targets set by the baseline's, flora's and flora-warm's runs, each method's fewest MB
    downloaded (all clients, all rounds) at a split whose held-out loss change reaches the
    target, seed 0."""
    lines = [
        "",
        "MB to reach a target (seed 0, runs of several rounds; the target is a run's loss "
        "change, a method's entry the cheapest of its splits that reaches it, with the split; "
        "- : none does):",
    ]
    for setting in METHODS:
        cells = _cells(setting, done)
        targets = sorted(
            {
                (change, f"{v} {r}x{TOTAL // r}")
                for (v, r), (change, _) in cells.items()
                if v in (BASELINE[setting], "flora", "flora-warm")
            }
        )
        if not targets:
            continue
        names = variants(setting, done)
        lines += ["", f"{setting}:", ""]
        lines.append("| target (loss change of) | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for target, source in targets:
            row = [f"{target:+.4f} ({source})"]
            for variant in names:
                reach = [
                    (mb, r) for (v, r), (c, mb) in cells.items() if v == variant and c <= target
                ]
                if reach:
                    mb, rounds = min(reach)
                    row.append(f"{mb:.0f} ({rounds}x{TOTAL // rounds})")
                else:
                    row.append("-")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _dominated(p: tuple[float, float, str], points: list[tuple[float, float, str]]) -> bool:
    """Another point is no costlier and no worse, and better in one of the two."""
    return any((q[0] <= p[0] and q[1] < p[1]) or (q[0] < p[0] and q[1] <= p[1]) for q in points)


def pareto_plot(path: Path) -> None:
    """Held-out loss change against MB downloaded, one point per finished run of several rounds
    (seed 0), the front (no run both lower and cheaper) joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, setting in zip(axes, METHODS, strict=True):
        points = []
        for name in finished():
            # one round downloads nothing but the start (its update reaches no client): the
            # bytes compare only across runs of several rounds
            if name.startswith(setting[:5]) and name.endswith("seed0") and "-1x" not in name:
                change, mb, _ = outcome(name)
                points.append((mb, change, name.removeprefix(setting[:5] + "-")[:-6]))
        placed: list[tuple[float, float]] = []
        for mb, change, label in sorted(points):
            ax.scatter(mb, change, s=18)
            # a label near an earlier one (within a label's width and a line) goes a line lower
            near = sum(abs(math.log10(mb) - x) < 0.3 and abs(change - y) < 0.004 for x, y in placed)
            placed.append((math.log10(mb), change))
            offset = (3, 2 - 9 * near)
            ax.annotate(label, (mb, change), fontsize=7, xytext=offset, textcoords="offset points")
        front = sorted(p for p in points if not _dominated(p, points))
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="front")
            ax.legend()
        ax.set_xscale("log")
        ax.set_xlabel("MB downloaded, all clients and rounds (log)")
        ax.set_ylabel("held-out loss change (lower is better)")
        ax.set_title(f"{setting} (seed 0; runs of 3 and 9 rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
