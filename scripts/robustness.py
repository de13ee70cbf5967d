"""The attack study of docs/robustness.md (issue 27): how far hostile clients move the model.

    python scripts/robustness.py            # every run (resumable run by run), then the report
    python scripts/robustness.py --report   # docs/robustness.md's tables from the records

Tiny random Llama (configs/tiny.toml) on Dolly, 3 rounds of 4 local steps, in two federations:
1 hostile client of 3 (ranks [8, 4, 2], client 1) and 3 colluders of 10 (ranks [8, 8, 4, 4, 4, 4,
2, 2, 2, 2], clients 1-3). Attacks (tests/faults/attacks.py), every round: the update scaled 5x
and 50x, and a sign flip of honest norm. FLoRA under each screen (the old default: reject beyond
100 x the others' median; clipping at 10, 5 and 3 x; the new default, clipping at 3 x the
others' median of norm / sqrt(rank)), and FedIT (equal ranks 4) under the old
screen with its mean, coordinate-wise median and trimmed mean (trim 0.2).

Damage: ||U - U_honest||_F / ||U_honest||_F, U the final merged update of the target modules (final
model minus base) and U_honest that of the honest run with the same method, screen and estimator.
The honest run's own round-to-round variation, ||U_3 - U_2||_F / ||U_3||_F (the last round's
change against the whole update), is the yardstick. Runs live in --work (not committed); each
finished run's record goes to docs/results/robustness/ at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

RECORDS = ROOT / "docs" / "results" / "robustness"
DOC = ROOT / "docs" / "robustness.md"
ROUNDS = 3
MODULES = ["q_proj", "v_proj"]
BASE = [
    "train.max_steps=4",
    "train.batch_size=4",
    "eval.samples=0",
    "data.heldout=48",
    f"federation.rounds={ROUNDS}",
]
FEDERATIONS = {
    "1of3": (["lora.ranks=[8, 4, 2]", "federation.num_clients=3", "data.limit=240"], (1,)),
    "3of10": (
        [
            "lora.ranks=[8, 8, 4, 4, 4, 4, 2, 2, 2, 2]",
            "federation.num_clients=10",
            "data.limit=600",
        ],
        (1, 2, 3),
    ),
}
ATTACKS = {"honest": 1.0, "scale5": 5.0, "scale50": 50.0, "signflip": -1.0}
RAW = "screening.rank_normalized=false"
SCREENS = {
    "old": ["screening.norm_multiple=100", "screening.norm_action=reject", RAW],
    "default": [],  # today's: clip at 3 x the others' median of norm / sqrt(rank)
    "clip10": ["screening.norm_multiple=10", "screening.norm_action=clip", RAW],
    "clip5": ["screening.norm_multiple=5", "screening.norm_action=clip", RAW],
    "clip3": ["screening.norm_multiple=3", "screening.norm_action=clip", RAW],
}
ESTIMATORS = ("mean", "median", "trimmed-mean")


@dataclass(frozen=True)
class Run:
    federation: str
    method: str  # "flora" or "fedit"
    screen: str
    estimator: str
    attack: str
    rounds: int = ROUNDS

    @property
    def name(self) -> str:
        tail = "" if self.rounds == ROUNDS else f"-r{self.rounds}"
        return f"{self.federation}-{self.method}-{self.screen}-{self.estimator}-{self.attack}{tail}"

    @property
    def honest(self) -> Run:
        return Run(self.federation, self.method, self.screen, self.estimator, "honest")

    def overrides(self) -> list[str]:
        extra, _ = FEDERATIONS[self.federation]
        out = [*BASE, *extra, *SCREENS[self.screen], f"federation.method={self.method}"]
        if self.method == "fedit":
            k = 3 if self.federation == "1of3" else 10
            out += [f"lora.ranks={[4] * k}", f"federation.options.robust={self.estimator}"]
        return [*out, f"federation.rounds={self.rounds}"]


def matrix() -> list[Run]:
    runs = []
    for fed in FEDERATIONS:
        for screen in SCREENS:
            runs += [Run(fed, "flora", screen, "mean", a) for a in ATTACKS]
        for estimator in ESTIMATORS:
            runs += [Run(fed, "fedit", "old", estimator, a) for a in ATTACKS]
        runs += [Run(fed, "flora", "old", "mean", "honest", ROUNDS - 1)]
        runs += [Run(fed, "fedit", "old", "mean", "honest", ROUNDS - 1)]
    return runs


def one(name: str, work: Path) -> None:
    """Run one configuration in this process (the worker)."""
    import torch
    from tests.faults.attacks import Attack, arm

    from flora import simulation
    from flora.config import load_config

    torch.set_num_threads(1)
    run = next(r for r in matrix() if r.name == name)
    config = load_config(str(ROOT / "configs" / "tiny.toml"), run.overrides())
    _, attackers = FEDERATIONS[run.federation]
    undo = arm(Attack(run.attack, attackers if run.attack != "honest" else (), ATTACKS[run.attack]))
    try:
        simulation.run(config, work / name, quiet=True)
    finally:
        undo()
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").open()]
    evals = [r for r in rows if r["kind"] == "eval"]
    servers = [r for r in rows if r["kind"] == "server"]
    record = {
        "run": name,
        "overrides": run.overrides(),
        "heldout_loss": evals[-1]["heldout_loss"],
        "base_loss": evals[0]["heldout_loss"],
        "rejected": [[r["round"], r["client"]] for r in rows if r["kind"] == "fault"],
        "clipped": [
            [s["round"], int(c), f] for s in servers for c, f in s.get("clipped", {}).items()
        ],
        "module_norm_ratio": {
            f"{r['round']}:{r['client']}": r.get("module_norm_ratio")
            for r in rows
            if r["kind"] == "client"
        },
    }
    RECORDS.mkdir(parents=True, exist_ok=True)
    tmp = RECORDS / f".{name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(RECORDS / f"{name}.json")


def _launch(name: str, work: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    done = subprocess.run(
        [sys.executable, __file__, "--one", name, "--work", str(work)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        return f"{name}: FAILED\n{done.stderr[-2000:]}"
    return name


def damages(work: Path) -> None:
    """Add each record's damage (and the honest runs' round-to-round variation)."""
    from tests.faults.attacks import damage, merged_update, update_norm_of

    for run in matrix():
        path = RECORDS / f"{run.name}.json"
        record = json.loads(path.read_text())
        if run.rounds != ROUNDS:
            continue
        if run.attack == "honest":
            shorter = Run(run.federation, run.method, "old", run.estimator, "honest", ROUNDS - 1)
            if run.screen == "old" and run.estimator == "mean":
                last, before = (
                    merged_update(work / run.name, MODULES),
                    merged_update(work / shorter.name, MODULES),
                )
                diff = {k: last[k] - before[k] for k in last}
                record["round_to_round"] = update_norm_of(diff) / update_norm_of(last)
            reference = Run(run.federation, run.method, "old", "mean", "honest")
            record["damage_vs_old_honest"] = damage(work / run.name, work / reference.name, MODULES)
        record["damage"] = damage(work / run.name, work / run.honest.name, MODULES)
        honest_loss = json.loads((RECORDS / f"{run.honest.name}.json").read_text())["heldout_loss"]
        record["loss_change"] = record["heldout_loss"] - honest_loss
        path.write_text(json.dumps(record, indent=1) + "\n")


def report() -> None:
    recs = {p.stem: json.loads(p.read_text()) for p in RECORDS.glob("*.json")}
    lines = []
    for fed, (_, attackers) in FEDERATIONS.items():
        honest = recs[f"{fed}-flora-old-mean-honest"]
        fedit = recs[f"{fed}-fedit-old-mean-honest"]
        lines += [
            f"### {fed.replace('of', ' of ')}: hostile client(s) {list(attackers)}",
            "",
            f"Honest round-to-round variation (||U_3 - U_2|| / ||U_3||): FLoRA "
            f"{honest['round_to_round']:.3f}, FedIT {fedit['round_to_round']:.3f}. Honest held-out "
            f"loss: FLoRA {honest['heldout_loss']:.4f}, FedIT {fedit['heldout_loss']:.4f} (base "
            f"{honest['base_loss']:.4f}).",
            "",
            "| method | screen / estimator | attack | damage | damage / variation | loss change | "
            "rejected | clipped |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for run in matrix():
            if run.federation != fed or run.rounds != ROUNDS:
                continue
            r = recs[run.name]
            yard = honest if run.method == "flora" else fedit
            how = run.screen if run.method == "flora" else f"old / {run.estimator}"
            damage = r["damage"] if run.attack != "honest" else r["damage_vs_old_honest"]
            lines.append(
                f"| {run.method} | {how} | {run.attack} | {damage:.3f} | "
                f"{damage / yard['round_to_round']:.2f} | {r['loss_change']:+.4f} | "
                f"{len(r['rejected'])} | {len(r['clipped'])} |"
            )
        lines.append("")
    text = DOC.read_text() if DOC.exists() else ""
    start, end = "<!-- robustness tables -->", "<!-- /robustness tables -->"
    block = f"{start}\n" + "\n".join(lines) + f"\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += "\n" + block + "\n"
    DOC.write_text(text)
    print(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/flora-robustness"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.one:
        one(args.one, args.work)
        return
    if not args.report:
        todo = [r.name for r in matrix() if not (RECORDS / f"{r.name}.json").exists()]
        from tqdm import tqdm

        with ThreadPoolExecutor(args.jobs) as pool:
            for result in tqdm(pool.map(lambda n: _launch(n, args.work), todo), total=len(todo)):
                if "FAILED" in result:
                    print(result, file=sys.stderr)
        damages(args.work)
    report()


if __name__ == "__main__":
    main()
