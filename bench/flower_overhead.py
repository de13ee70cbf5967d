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
By default every node has a warm `flora flower-worker`, so the ClientApp imports no torch and
the model and data stay loaded; --no-workers measures the plain setup, where every ClientApp
process imports torch, transformers and peft and loads the model. The goal is an outside share
<= 15% on Flower; the fixed part per round gives the training time at which a round reaches it.

    .venv/bin/python bench/flower_overhead.py                  # SmolLM2, 2 clients, ~4 min
    .venv/bin/python bench/flower_overhead.py --steps 40       # longer local rounds
    .venv/bin/python bench/flower_overhead.py --no-workers     # ClientApps without workers
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


def run_flower(
    config_path: str, overrides: list[str], out: Path, runtime: str, workers: bool
) -> Path:
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
    if runtime == "sim":
        command.append("--sim")
    if not workers:
        command.append("--no-workers")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return out


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
        "--no-workers", action="store_true", help="deployment without flora flower-worker"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of embedded (nodes: cpus / clients)"
    )
    parser.add_argument("--out", type=Path, help="keep both runs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the figures here (make bench)")
    args = parser.parse_args(argv)
    ranks = [16 // 2**k or 1 for k in range(args.clients)]
    overrides = [
        f"federation.num_clients={args.clients}",
        f"lora.ranks={ranks}",
        f"federation.rounds={args.rounds}",
        f"train.max_steps={args.steps}",
        "eval.samples=0",
        *args.extra,
    ]
    workers = "no workers" if args.no_workers else "warm workers"
    print(
        f"{args.config} with {overrides}, Flower {args.runtime} ({workers}), {os.cpu_count()} cpus"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        start = time.perf_counter()
        embedded = run_embedded(args.config, overrides, out / "embedded", args.threads)
        middle = time.perf_counter()
        flower = run_flower(
            args.config, overrides, out / "flower", args.runtime, not args.no_workers
        )
        end = time.perf_counter()
        print(f"\nwhole runs: embedded {middle - start:.0f} s, flower {end - middle:.0f} s")
        embedded_share = report("embedded", rounds(embedded, parallel=False))
        flower_table = rounds(flower, parallel=True)
        share = report("flower", flower_table)
        whole = (end - middle) / (middle - start)
    fixed = statistics.mean(row["round_s"] - row["train_s"] for row in flower_table)
    print(
        f"flower: {fixed:.1f} s a round outside training -> outside <= {GOAL:.0%} once a "
        f"client trains >= {fixed * (1 - GOAL) / GOAL:.0f} s a round; "
        f"goal {'met' if share <= GOAL else 'NOT met'} at {args.steps} steps"
    )
    if args.json:
        figures = {
            "Flower share of a round outside training": {
                "value": share,
                "unit": "share",
                "baseline": "the round's own time",
                "goal": f"<= {GOAL}",
            },
            "embedded share of a round outside training": {
                "value": embedded_share,
                "unit": "share",
                "baseline": "the round's own time",
                "goal": None,
            },
            "Flower whole run": {
                "value": whole,
                "unit": "x",
                "baseline": "the embedded runtime, same config",
                "goal": None,
            },
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
