"""`make bench`: every benchmark in bench/, one after the other, into bench/results.md and .json.

Each benchmark runs in its own process at the sizes below, writes its headline figures with
``--json``, and every figure is a ratio (or a share) against a baseline measured in the same
process, named beside it: absolute timings on a shared machine are noise, ratios within one run
much less so. A benchmark that fails or times out is recorded as failed with its last output
lines, and the others still run.

The one-thread benchmarks run in two lanes side by side (--lanes, one per core): each compares
its contenders call by call or rotated within its own process, so a neighbour's load falls on
both sides of its ratio. The benchmarks marked ``alone`` run first, by themselves: aggregation is
bound by memory bandwidth (a neighbour would take its share of it unevenly between calls),
flower_overhead starts a node per core, and memory_settings times its settings one after another
in separate processes (a neighbour that finishes half-way would favour the later ones). One
after another, the run of 2026-12-02 took 43 minutes on a 2-core CPU (beside other work); two
lanes took 13 on 2026-12-06; the goal is under 30.

    .venv/bin/python bench/run_all.py                  # everything (make bench)
    .venv/bin/python bench/run_all.py --only aggregation dp_sgd
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PY = sys.executable


@dataclass(frozen=True)
class Bench:
    name: str
    args: list[str]  # after the script's path
    what: str  # one line: what is measured against what
    timeout: int = 600
    needs: tuple[str, ...] = field(default=())  # importable modules it needs
    alone: bool = False  # run by itself, not beside another benchmark (see above)


BENCHES = [
    Bench(
        "aggregation",
        ["--repeats", "5", "--warmup", "2"],
        "every method's aggregation of 10 Llama-7B-shaped q,v adapters against a plain copy",
        alone=True,
    ),
    Bench(
        "dp_sgd",
        ["--threads", "1", "--steps", "3", "--repeats", "3"],
        "a client's DP-SGD training against the same training without it",
    ),
    Bench(
        "training",
        ["--threads", "1", "--steps", "3", "--repeats", "3"],
        "flora's client training against a bare PEFT loop and transformers.Trainer",
    ),
    Bench(
        "cpu_precision",
        ["--threads", "1"],
        "bf16 autocast training on this CPU against fp32 (train.precision = 'auto''s CPU choice)",
    ),
    Bench(
        "length_grouping",
        ["--threads", "1", "--examples", "32", "--repeats", "2"],
        "length-grouped batches against shuffled ones",
    ),
    Bench(
        "round_overhead",
        ["--threads", "1", "--clients", "4", "--rounds", "2", "--max-steps", "2"],
        "the share of a round spent outside the clients' training",
    ),
    Bench(
        "memory",
        ["--part", "k", "--models", "tiny", "smollm2", "--ks", "2", "10", "--threads", "1"],
        "peak memory with 10 simulated clients against 2",
    ),
    Bench(
        "memory_settings",
        ["--length", "256", "--threads", "1"],
        "one client's memory and step time with a bf16, 8-bit and 4-bit base against fp32",
        needs=("bitsandbytes",),
        alone=True,
    ),
    Bench(
        "mmlu_speed",
        ["--limit-per-subject", "1", "--subjects", "20", "--threads", "1"],
        "flora's log-likelihood MMLU scoring against generate-and-parse",
    ),
    Bench(
        "flower_overhead",
        ["--steps", "4", "--threads", "1", "--set", "data.limit=400", "--set", "data.heldout=16"],
        "a Flower deployment against the embedded runtime",
        needs=("flwr",),
        alone=True,
    ),
    Bench(
        "merge_precision",
        [],
        "merged updates held by a bf16 base with fp32 target modules against an all-bf16 base",
    ),
]


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _merge_precision(tmp: Path, env: dict[str, str], timeout: int) -> dict[str, Any]:
    """A 3-round tiny run, then the replay of its merged updates (bench/merge_precision.py)."""
    run = tmp / "merge-precision-run"
    subprocess.run(
        [
            PY,
            "-m",
            "flora.cli",
            "run",
            "tiny",
            "--out",
            str(run),
            "--quiet",
            "--set",
            "federation.rounds=3",
            "--set",
            "eval.samples=0",
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        capture_output=True,
    )
    out = tmp / "merge-precision.json"
    command = [PY, str(BENCH / "merge_precision.py"), str(run), "--json", str(out)]
    done = subprocess.run(
        command, env=env, cwd=ROOT, timeout=timeout, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    errors = json.loads(out.read_text())["replay"]["errors"]
    figures = {
        "merge error, bf16 base with fp32 target modules": {
            "value": errors["bf16+fp32 targets"] / errors["bf16"],
            "unit": "x",
            "goal": "< 1",
            "baseline": "the same updates merged into an all-bf16 base (relative error of the "
            "cumulative update against fp32)",
        },
        "relative merge error, bf16 base with fp32 target modules": {
            "value": errors["bf16+fp32 targets"],
            "unit": "relative",
            "goal": None,
            "baseline": "the fp32 base's cumulative update",
        },
        "relative merge error, all-bf16 base": {
            "value": errors["bf16"],
            "unit": "relative",
            "goal": None,
            "baseline": "the fp32 base's cumulative update",
        },
    }
    return {"figures": figures, "output": done.stdout}


def run_bench(bench: Bench, tmp: Path) -> dict[str, Any]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    missing = [m for m in bench.needs if not _available(m)]
    if missing:
        return {"status": "skipped", "reason": f"needs {', '.join(missing)}"}
    start = time.perf_counter()
    try:
        if bench.name == "merge_precision":
            result = _merge_precision(tmp, env, bench.timeout)
        else:
            out = tmp / f"{bench.name}.json"
            command = [PY, str(BENCH / f"{bench.name}.py"), *bench.args, "--json", str(out)]
            done = subprocess.run(
                command, env=env, cwd=ROOT, timeout=bench.timeout, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
            result = {"figures": json.loads(out.read_text()), "output": done.stdout}
        result["status"] = "ok"
    except subprocess.TimeoutExpired:
        result = {"status": "failed", "reason": f"timed out after {bench.timeout} s"}
    except (RuntimeError, subprocess.CalledProcessError, OSError, ValueError) as error:
        result = {"status": "failed", "reason": str(error)[-2000:]}
    result["seconds"] = time.perf_counter() - start
    return result


def _verdict(figure: dict[str, Any]) -> str:
    goal, value = figure.get("goal"), figure["value"]
    if not goal or not isinstance(goal, str) or goal.split()[0] not in ("<=", ">=", "<", ">"):
        return ""
    op, bound = goal.split()[0], float(goal.split()[1])
    ok = {"<=": value <= bound, ">=": value >= bound, "<": value < bound, ">": value > bound}[op]
    return "met" if ok else "NOT met"


def _value(figure: dict[str, Any]) -> str:
    value, unit = figure["value"], figure.get("unit")
    if unit == "x":
        return f"{value:.2f}x" if value >= 0.01 or value == 0 else f"{value:.2g}x"
    if unit == "share":
        return f"{value:.1%}"
    return f"{value:.3g}"


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# flora benchmarks (`make bench`)",
        "",
        f"Measured {meta['date']} at commit {meta['commit']} on {meta['machine']} "
        f"({meta['cpus']} CPUs), Python {meta['python']}, torch {meta['torch']}; "
        f"{meta['seconds'] / 60:.1f} minutes in all, {meta.get('lanes', 1)} lane(s). Every "
        "figure is measured against the baseline beside it, in the same process; regenerate "
        "with `make bench`.",
        "",
        "| benchmark | figure | value | baseline | goal |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        if result["status"] != "ok":
            lines.append(
                f"| {name} | {result['status']}: {result['reason'].splitlines()[-1]} | | | |"
            )
            continue
        for label, figure in result["figures"].items():
            goal = figure.get("goal") or ""
            verdict = _verdict(figure)
            goal = f"{goal} ({verdict})" if verdict else goal
            lines.append(f"| {name} | {label} | {_value(figure)} | {figure['baseline']} | {goal} |")
    lines += ["", "## What each benchmark measures", ""]
    for bench in BENCHES:
        if bench.name in results:
            seconds = results[bench.name].get("seconds", 0.0)
            lines.append(
                f"- `bench/{bench.name}.py {' '.join(bench.args)}`: {bench.what} ({seconds:.0f} s)."
            )
    lines += ["", "## Output", ""]
    for name, result in results.items():
        if result.get("output"):
            lines += [
                f"<details><summary>{name}</summary>",
                "",
                "```",
                result["output"].rstrip(),
                "```",
                "",
                "</details>",
                "",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES])
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--lanes",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="one-thread benchmarks side by side (1: one after another)",
    )
    args = parser.parse_args(argv)
    import torch

    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, capture_output=True
        ).stdout.strip()
        or "unknown"
    )
    start = time.perf_counter()
    results: dict[str, Any] = {}

    def one(bench: Bench, tmp: Path) -> None:
        print(f"bench: {bench.name} ...", flush=True)
        results[bench.name] = run_bench(bench, tmp)
        status = results[bench.name]["status"]
        print(f"bench: {bench.name} {status} ({results[bench.name]['seconds']:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for bench in (b for b in chosen if b.alone):
            one(bench, Path(tmp))
        with ThreadPoolExecutor(max(1, args.lanes)) as lanes:
            list(lanes.map(lambda b: one(b, Path(tmp)), [b for b in chosen if not b.alone]))
    results = {b.name: results[b.name] for b in chosen}  # the table in BENCHES' order
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - start,
        "lanes": args.lanes,
    }
    data = {
        "meta": meta,
        "results": {
            k: {key: v for key, v in r.items() if key != "output"} for k, r in results.items()
        },
    }
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, meta))
    print(f"bench: wrote {args.out.with_suffix('.md')} and .json ({meta['seconds'] / 60:.1f} min)")
    return 0 if all(r["status"] != "failed" for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
