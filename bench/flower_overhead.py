"""Flower overhead: the share of a round spent outside client training, Flower against embedded.

Runs one config on the embedded runtime (flora.simulation.run, clients one after another in this
process) and on Flower (scripts/flower-deploy.sh: a loopback deployment with a SuperLink and one
SuperNode per client, or --runtime sim for Flower's simulation runtime), then reads the server
rows of both runs' metrics.jsonl:

    embedded  outside = 1 - sum_k train_k / round      (clients train one after another)
    flower    outside = 1 - max_k train_k / round      (nodes train at the same time)

where train_k is client k's time inside flora.training.train_client and round is the round's
wall time (configure, messages, training, aggregation). On Flower the rest is: the message
transport and polling (`to node`: from the round's start until the node starts the message;
`back`: from the node's reply until the round ends), the ClientApp process a SuperNode starts
for every message, and the client's preparation (`prepare`: base restore and catch-up, data).
Two node setups run in the same sitting (--setups): `flower-nodes`, Flower's own SuperNode
(it sleeps 3 s between idle pulls) starting a ClientApp process per message that relays the work
to the node's warm `flora flower-worker` (flora's setup until 2026-12-07), and `flora-nodes`,
`flora flower-supernode` (idle pulls every 0.2 s) with the warm worker as its executor (no
process per message; flora.flower.executor). `no-workers` adds the plain setup, where every
ClientApp process imports torch, transformers and peft and loads the model. The fixed cost is
a round's time outside training; the goal is <= 2 s a round from round 2 on (round 1 also
loads the model and data on each node) for flora's nodes, and an outside share <= 15%: the
fixed part per round gives the training time at which a round reaches it.

    .venv/bin/python bench/flower_overhead.py                  # SmolLM2, 2 clients, both setups
    .venv/bin/python bench/flower_overhead.py --config configs/tiny.toml --rounds 5  # fixed cost
    .venv/bin/python bench/flower_overhead.py --steps 40       # longer local rounds
    .venv/bin/python bench/flower_overhead.py --setups flower-nodes,flora-nodes,no-workers
    .venv/bin/python bench/flower_overhead.py --runtime sim    # Flower's simulation runtime
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flora import simulation
from flora.config import load_config
from flora.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.15
FIXED_GOAL = 2.0  # seconds a round outside training on loopback (issue 26)


def rounds(run_dir: Path, parallel: bool) -> list[dict[str, float]]:
    """Per round: wall time, critical-path training time, outside share, median prepare."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    out = []
    for server in (r for r in rows if r["kind"] == "server"):
        clients = [r for r in rows if r["kind"] == "client" and r["round"] == server["round"]]
        train = max(r["seconds"] for r in clients) if parallel else server["train_seconds"]
        prepare = [r["prepare_seconds"] for r in clients if r.get("prepare_seconds") is not None]
        row = {
            "round": server["round"],
            "round_s": server["round_seconds"],
            "train_s": train,
            "outside": 1.0 - train / server["round_seconds"],
            "prepare_s": statistics.median(prepare) if prepare else float("nan"),
            "to_node_s": float("nan"),
            "from_node_s": float("nan"),
        }
        if parallel and clients and clients[0].get("received_at") is not None:
            # the last client to reply: server -> its node's work starts; its work ends -> server
            last = max(clients, key=lambda r: r["replied_at"])
            row["to_node_s"] = last["received_at"] - server["started_at"]
            row["from_node_s"] = server["started_at"] + server["round_seconds"] - last["replied_at"]
        out.append(row)
    return out


def run_embedded(config_path: str, overrides: list[str], out: Path, threads: int) -> Path:
    torch.set_num_threads(threads)
    simulation.run(load_config(config_path, overrides), out, quiet=True)
    return out


# the node setups compared: Flower's own (a ClientApp process per message relaying to the warm
# worker, flower-supernode's 3 s idle poll: flora's setup until 2026-12-07) and flora's (the
# worker as the SuperNode's executor, flora flower-supernode polling every 0.2 s)
SETUPS = {
    "flower-nodes": ["--relay", "--idle-poll", "0"],
    "flora-nodes": [],
    "no-workers": ["--no-workers", "--idle-poll", "0"],
}


def run_flower(config_path: str, overrides: list[str], out: Path, runtime: str, setup: str) -> Path:
    command = [
        "bash",
        str(ROOT / "scripts" / "flower-deploy.sh"),
        "-c",
        config_path,
        "-s",
        ";".join(overrides),
        "-o",
        str(out),
        "-t",
        "3000",
    ]
    command += ["--sim"] if runtime == "sim" else SETUPS[setup]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return out


def fixed_cost(table: list[dict[str, float]]) -> tuple[float, float]:
    """Seconds a round outside training: (mean over every round, mean from round 2 on: the
    steady cost, without the first round's one-time loads)."""
    outside = [row["round_s"] - row["train_s"] for row in table]
    return statistics.mean(outside), statistics.mean(outside[1:] or outside)


def report(name: str, table: list[dict[str, float]]) -> float:
    for row in table:
        print(
            f"{name:9} round {int(row['round'])}: {row['round_s']:7.1f} s, training "
            f"{row['train_s']:7.1f} s, outside {row['outside']:6.1%}, "
            f"prepare {row['prepare_s']:5.1f} s, to node {row['to_node_s']:4.1f} s, "
            f"back {row['from_node_s']:4.1f} s"
        )
    share = statistics.mean(row["outside"] for row in table)
    print(f"{name:9} outside share, mean over rounds: {share:.1%}")
    return share


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="train.max_steps per client round")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runtime", choices=("deploy", "sim"), default="deploy")
    parser.add_argument(
        "--setups",
        default="flower-nodes,flora-nodes",
        help=f"deployments to run, comma-separated, of: {', '.join(SETUPS)}",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of embedded (nodes: cpus / clients)"
    )
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the figures here (make bench)")
    args = parser.parse_args(argv)
    setups = ["sim"] if args.runtime == "sim" else args.setups.split(",")
    unknown = [name for name in setups if name not in SETUPS and name != "sim"]
    if unknown:
        parser.error(f"--setups: unknown {unknown}; choose of {', '.join(SETUPS)}")
    ranks = [16 // 2**k or 1 for k in range(args.clients)]
    overrides = [
        f"federation.num_clients={args.clients}",
        f"lora.ranks={ranks}",
        f"federation.rounds={args.rounds}",
        f"train.max_steps={args.steps}",
        "eval.samples=0",
        *args.extra,
    ]
    print(f"{args.config} with {overrides}, Flower {', '.join(setups)}, {os.cpu_count()} cpus")
    results: dict[str, tuple[float, float, float, float]] = {}  # share, fixed, steady, seconds
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        start = time.perf_counter()
        embedded = run_embedded(args.config, overrides, out / "embedded", args.threads)
        embedded_s = time.perf_counter() - start
        for name in setups:
            began = time.perf_counter()
            run_dir = run_flower(args.config, overrides, out / name, args.runtime, name)
            results[name] = (0.0, 0.0, 0.0, time.perf_counter() - began)
            table = rounds(run_dir, parallel=True)
            results[name] = (report(name, table), *fixed_cost(table), results[name][3])
        embedded_table = rounds(embedded, parallel=False)
        embedded_share = report("embedded", embedded_table)
    embedded_round = statistics.mean(row["round_s"] for row in embedded_table)
    print(f"\nwhole runs: embedded {embedded_s:.0f} s; " + ", ".join(
        f"{name} {r[3]:.0f} s ({r[3] / embedded_s:.2f}x)" for name, r in results.items()
    ))  # fmt: skip
    for name, (_, fixed, steady, _) in results.items():
        print(
            f"{name}: {fixed:.2f} s a round outside training ({steady:.2f} s from round 2 on; "
            f"the embedded round: {embedded_round:.2f} s) -> outside <= {GOAL:.0%} once a "
            f"client trains >= {steady * (1 - GOAL) / GOAL:.0f} s a round"
        )
    if "flower-nodes" in results and "flora-nodes" in results:
        before, after = results["flower-nodes"][2], results["flora-nodes"][2]
        print(
            f"flora's nodes: {after:.2f} s against Flower's own {before:.2f} s a round from round "
            f"2 on ({after / before:.2f}x); goal <= {FIXED_GOAL:.0f} s: "
            f"{'met' if after <= FIXED_GOAL else 'NOT met'}"
        )
    if args.json:
        figures: dict[str, dict[str, object]] = {
            "embedded share of a round outside training": {
                "value": embedded_share,
                "unit": "share",
                "baseline": "the round's own time",
                "goal": None,
            },
        }
        for name, (share, _, steady, seconds) in results.items():
            figures[f"{name}: fixed cost a round, from round 2 on"] = {
                "value": steady,
                "unit": "s",
                "baseline": f"the embedded round, {embedded_round:.2f} s, same config",
                "goal": f"<= {FIXED_GOAL:.0f} s" if name == "flora-nodes" else None,
            }
            figures[f"{name}: share of a round outside training"] = {
                "value": share,
                "unit": "share",
                "baseline": "the round's own time",
                "goal": None,
            }
            figures[f"{name}: whole run"] = {
                "value": seconds / embedded_s,
                "unit": "x",
                "baseline": "the embedded runtime, same config",
                "goal": None,
            }
        if "flower-nodes" in results and "flora-nodes" in results:
            figures["flora's nodes' fixed cost a round"] = {
                "value": results["flora-nodes"][2] / results["flower-nodes"][2],
                "unit": "x",
                "baseline": "Flower's own nodes (ClientApp process per message, 3 s idle poll)",
                "goal": "< 1",
            }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
