"""Flower's own `flwr run` of the app on a local simulation federation, as a user types it.

The connection is Flower's default ``local`` (address ``:local:``): `flwr run` starts a local
SuperLink in simulation mode, detached, on the ports named by FLWR_LOCAL_SUPERLINK_HTTP_API_PORT
and FLWR_LOCAL_CONTROL_API_PORT (free ones here) with its state under FLWR_HOME (a temporary
directory). The module stops that SuperLink at the end, by the PID of the process whose command
line names this FLWR_HOME.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

from tests.processes import alive_in_groups

from flora.metrics import read_metrics
from flora.packaged import FLOWER_APP_DIR

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _superlinks_of(home: Path) -> list[int]:
    """PIDs of the flower-superlink processes whose command line names ``home``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue
        if b"flower-superlink" in text and str(home).encode() in text:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Iterator[tuple[dict[str, str], Path]]:
    """Flower's environment for `flwr run` on its ``:local:`` simulation SuperLink."""
    tmp = tmp_path_factory.mktemp("flwr-local")
    home = tmp / "flwr-home"
    env = os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # flora is installed here
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    yield env, tmp
    groups = set()
    for pid in _superlinks_of(home):  # detached: each leads its own process group
        groups.add(os.getpgid(pid))
        os.killpg(os.getpgid(pid), signal.SIGTERM)
    deadline = time.monotonic() + 20
    while alive_in_groups(groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    for group in groups:
        if alive_in_groups({group}):
            os.killpg(group, signal.SIGKILL)
    assert not _superlinks_of(home)


def flwr_run(env: dict[str, str], run_dir: Path, *extra: str) -> dict:
    """`flwr run APP --stream` of the tiny config, one round, then `flwr ls` of that run."""
    run_config = (
        f"config='tiny' set='federation.rounds=1' run-dir='{run_dir}' "
        f"state-dir='{run_dir.parent / 'state'}' node-wait=300"
    )
    done = subprocess.run(
        [str(BIN / "flwr"), "run", str(FLOWER_APP_DIR), "--run-config", run_config, *extra,
         "--stream"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    listed = subprocess.run(
        [str(BIN / "flwr"), "ls", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    runs = json.loads(listed.stdout)["runs"]
    latest = max(runs, key=lambda r: r["pending-at"])
    return latest | {"log": done.stdout + done.stderr}


def test_flwr_run_of_the_app_on_a_local_simulation_federation_sized_by_the_config(local):
    # Prepare: the tiny config has 3 clients, so 3 simulated SuperNodes
    env, tmp = local
    run_dir = tmp / "sized"
    # Execute
    run = flwr_run(env, run_dir, "--federation-config", "num-supernodes=3")
    # Assert
    assert run["status"] == "finished:completed", run["log"][-3000:]
    assert (run_dir / "summary.json").is_file()
    server = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "server"]
    assert [r["clients"] for r in server] == [[0, 1, 2]]
    assert (run_dir / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_federation_of_another_size_is_one_line_at_once(local):
    # Prepare: Flower's default simulation federation has 2 SuperNodes; tiny has 3 clients
    env, tmp = local
    run_dir = tmp / "mismatch"
    # Execute
    run = flwr_run(env, run_dir)
    # Assert: failed in the first node query, not after node-wait's 300 s, with the fix, and
    # flora's refusal is one line of Flower's log (no traceback)
    assert run["status"] == "finished:failed"
    assert run["elapsed"] < 300
    fix = "but the config has 3 clients"
    assert fix in run["status-details"]
    assert "--federation-config 'num-supernodes=3'" in run["status-details"]
    lines = [line for line in run["log"].splitlines() if fix in line]
    assert len(lines) == 1 and "flora: node" in lines[0]
    assert "Traceback" not in run["log"]
    assert not (run_dir / "checkpoints").exists()


def test_the_dry_run_names_the_flwr_run_command_sized_by_the_config(tmp_path):
    # Prepare
    from flwr.common.config import parse_config_args

    from flora.config import load_config
    from flora.flower.sim import flwr_run_command
    from flora.packaged import config_path

    overrides = ["lora.ranks=[8, 4, 2, 2]", "federation.num_clients=4", "train.lr=1e-3"]
    config = load_config(config_path("tiny"), overrides)
    # Execute
    command = flwr_run_command(config, config_path("tiny"), overrides, tmp_path / "run $x")
    # Assert: the words bash hands Flower give back the config, the overrides and the size
    shown = ["bash", "-c", command.replace("flwr run", "printf '%s\\0' flwr run", 1)]
    words = subprocess.run(shown, capture_output=True, text=True, check=True).stdout
    words = words.split("\0")[:-1]
    assert words[:3] == ["flwr", "run", str(FLOWER_APP_DIR)]
    federation = parse_config_args([words[words.index("--federation-config") + 1]])
    assert federation["num-supernodes"] == 4
    run_config = parse_config_args([words[words.index("--run-config") + 1]])
    assert run_config == {
        "config": str(config_path("tiny").resolve()),
        "set": ";".join(overrides),
        "run-dir": str((tmp_path / "run $x").resolve()),
    }
