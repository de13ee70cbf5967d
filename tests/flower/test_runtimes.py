"""The Flower apps on Flower's real runtimes: the simulation (Ray) and a loopback deployment.

The deployment test runs scripts/flower-deploy.sh: a real SuperLink and two SuperNodes on free
ports, FLWR_HOME in a temporary directory, every process stopped by the script (checked here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

import torch
from safetensors.torch import load_file
from tests.processes import alive_in_groups, deploy

from flora import simulation
from flora.cli import main
from flora.config import load_config
from flora.metrics import read_metrics

TINY = "configs/tiny.toml"
TWO_CLIENTS = ["federation.num_clients=2", "lora.ranks=[8, 4]"]


def rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def update(run_dir: Path, round: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"round_{round:04d}" / "update.safetensors")


def test_flower_sim_gives_the_embedded_global_update(tmp_path, torch_single_thread):
    # Prepare: a user's own Flower configuration in their FLWR_HOME
    sim, embedded = tmp_path / "sim", tmp_path / "embedded"
    overrides = [arg for o in TWO_CLIENTS for arg in ("--set", o)]
    users = Path(os.environ["FLWR_HOME"]) / "config.toml"
    users.write_text('[superlink]\ndefault = "mine"\n')
    # Execute: the CLI on Flower's simulation runtime, then the embedded runtime
    command = ["run", TINY, *overrides, "--runtime", "flower-sim", "--out", str(sim), "--quiet"]
    assert main(command) == 0
    simulation.run(load_config(TINY, TWO_CLIENTS), embedded, quiet=True)
    # Assert: 2 clients, 2 rounds, the same global update each round
    assert [r["clients"] for r in rows(sim, "server")] == [[0, 1], [0, 1]]
    for t in (1, 2):
        ours, theirs = update(sim, t), update(embedded, t)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    before, after = (r["heldout_loss"] for r in rows(sim, "eval"))
    assert after < before
    assert (sim / "final" / "model" / "model.safetensors").is_file()
    assert not (sim / "nodes").exists()  # the node state is dropped after a good run
    assert users.read_text() == '[superlink]\ndefault = "mine"\n'  # left as it was


def test_a_flower_sim_run_that_died_resumes_from_its_checkpoint(tmp_path, torch_single_thread):
    # Prepare: the ServerApp (a process of Flower's, started by the SuperLink) dies writing
    # round 3's checkpoint: a file stands where its temporary directory goes
    sim, embedded = tmp_path / "sim", tmp_path / "embedded"
    overrides = [arg for o in [*TWO_CLIENTS, "federation.rounds=3"] for arg in ("--set", o)]
    (sim / "checkpoints").mkdir(parents=True)
    (sim / "checkpoints" / "round_0003.tmp").write_text("in the way")
    command = ["run", TINY, *overrides, "--runtime", "flower-sim", "--out", str(sim), "--quiet"]
    assert main(command) == 2
    assert (sim / "checkpoints" / "round_0002").is_dir()
    assert not (sim / "checkpoints" / "round_0003").exists()
    assert len(list((sim / "nodes").glob("run-*/partition-*/base-1.safetensors"))) == 2
    (sim / "checkpoints" / "round_0003.tmp").unlink()
    # Execute
    assert main(["run", "--resume", str(sim), "--quiet"]) == 2  # not with the embedded runtime
    assert main(["run", "--resume", str(sim), "--runtime", "flower-sim", "--quiet"]) == 0
    # Assert: the embedded run's updates, each server row once, the nodes went on from their
    # stored bases (one update to catch up, not two), their state dropped at the end
    simulation.run(load_config(TINY, [*TWO_CLIENTS, "federation.rounds=3"]), embedded, quiet=True)
    for t in (1, 2, 3):
        ours, theirs = update(sim, t), update(embedded, t)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    assert [r["round"] for r in rows(sim, "server")] == [1, 2, 3]
    assert [r["catch_up_rounds"] for r in rows(sim, "client") if r["round"] == 3] == [1, 1]
    assert not (sim / "nodes").exists()
    assert (sim / "logs" / "run.log").is_file()  # Flower's log of each run, as streamed


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A 2-node loopback deployment, 2 rounds; partition 1's ClientApp fails in round 1."""
    tmp = tmp_path_factory.mktemp("deploy")
    faulty_worker = f"{sys.executable} {Path(__file__).parent / 'faults.py'} 1@1"  # 1 fails in 1
    return deploy(tmp, "-n", "2", "-s", ";".join(TWO_CLIENTS), "-w", faulty_worker)


def test_a_loopback_deployment_runs_and_stops_everything_it_started(deployment):
    done, run_dir = deployment
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished:completed" in done.stderr
    for name in ("config.json", "summary.json", "final/model/model.safetensors"):
        assert (run_dir / name).is_file(), name
    groups = {int(p) for p in (run_dir / "logs" / "pids").read_text().split()}
    assert len(groups) == 5  # SuperLink, two workers, two SuperNodes, each with its children
    assert alive_in_groups(groups) == []
    assert not list(Path(run_dir.parent).glob("flora-flower.*"))  # its FLWR_HOME is gone
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["loss_after"] < summary["loss_before"]


def test_a_node_that_fails_mid_round_is_left_out_and_catches_up(deployment):
    _, run_dir = deployment
    servers = rows(run_dir, "server")
    assert [(r["clients"], r["failed"]) for r in servers] == [([0], [1]), ([0, 1], [])]
    round2 = {r["client"]: r["catch_up_rounds"] for r in rows(run_dir, "client") if r["round"] == 2}
    assert round2 == {0: 1, 1: 1}  # client 1 gets round 1's update, which it never trained in
    assert "injected fault" in (run_dir / "logs" / "run.log").read_text()
    # every train message ran on the node's warm worker (its executor), none in a process of
    # its own: round 1 failed on partition 1's, as injected there
    served = [(run_dir / "logs" / f"worker-{k}.log").read_text() for k in (0, 1)]
    assert [log.count("train for partition") for log in served] == [2, 2]
    assert "train for partition 1 failed" in served[1] and "injected fault" in served[1]
    assert all("flwr-clientapp" not in log for log in served)


def test_the_relay_setup_with_flowers_own_supernodes_still_runs(tmp_path):
    # Flower's own flower-supernode (3 s idle poll) starting a ClientApp process per message,
    # which hands the work to the node's worker over its Unix socket
    done, run_dir = deploy(
        tmp_path, "--relay", "--idle-poll", "0", "-n", "2", "-s", ";".join(TWO_CLIENTS)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    served = [(run_dir / "logs" / f"worker-{k}.log").read_text() for k in (0, 1)]
    assert [log.count("train for partition") for log in served] == [2, 2]
    assert all("ready on" in log for log in served)  # the socket worker, not an executor
