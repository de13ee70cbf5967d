"""``flora run --runtime flower-sim``: the Flower app on a local simulation federation, through
Flower's own commands.

A SuperLink in simulation mode on 127.0.0.1 (flora.flower.link), ``flwr run`` of the app shipped
in the package (flora.packaged.FLOWER_APP_DIR) with ``--federation-config num-supernodes=N``, N
the config's clients (one virtual SuperNode each, node config ``partition-id`` = client index),
Ray running the ClientApps with ``flower.client_cpus`` / ``flower.client_gpus`` each; the run's
log streams here unless ``quiet``. The ServerApp reads the resolved config from a TOML written
for it (the same config, loaded back equal: tests/test_cli_dry_run.py). The node state (each
partition's base snapshots) lives in ``RUN_DIR/nodes/`` and is removed when the run succeeds;
``resume`` continues a run that stopped after a checkpoint, its nodes going on from the state
they kept there. Flower's state goes to a temporary FLWR_HOME with its telemetry off
(flora.flower.home); the SuperLink is stopped when the run ends, whatever the way.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from flora.config import RunConfig, config_toml
from flora.errors import FloraError
from flora.flower.link import LocalSuperLink
from flora.outputs import RunResult
from flora.packaged import FLOWER_APP_DIR

__all__ = ["backend_config", "federation_config", "flwr_run_command", "simulate"]


def backend_config(config: RunConfig, cpus_per_client: int | None = None) -> dict[str, Any]:
    """Ray's resources: ``flower.client_cpus`` / ``flower.client_gpus`` per client (GPUs: 1 per
    client when ``train.device`` resolves to CUDA, unless set), out of this machine's."""
    import torch

    from flora.devices import resolve_device

    device = resolve_device(config.train.device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    per_client = config.flower.client_gpus
    if per_client is None:
        per_client = 1.0 if gpus else 0.0
    if per_client > 0 and not gpus:
        raise FloraError(
            f"flower.client_gpus = {per_client} but train.device = {config.train.device!r} is "
            "no CUDA GPU; set train.device = 'cuda' on a GPU machine, or flower.client_gpus = 0"
        )
    if per_client > gpus:
        raise FloraError(
            f"flower.client_gpus = {per_client} but this machine has {gpus} GPU(s); a client "
            "can use at most all of them"
        )
    cpus = os.cpu_count() or 1
    client = {"num_cpus": cpus_per_client or config.flower.client_cpus, "num_gpus": per_client}
    return {
        "client_resources": client,
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "logging_level": "ERROR"},
    }


def federation_config(
    config: RunConfig, cpus_per_client: int | None = None, *, quiet: bool = False
) -> dict[str, Any]:
    """``flwr run --federation-config``: one simulated SuperNode per client, Ray's resources."""
    backend = backend_config(config, cpus_per_client)
    client, init = backend["client_resources"], backend["init_args"]
    return {
        "num-supernodes": 1 if config.federation.centralized else config.federation.num_clients,
        "client-resources-num-cpus": int(client["num_cpus"]),
        "client-resources-num-gpus": float(client["num_gpus"]),
        "init-args-num-cpus": int(init["num_cpus"]),
        "init-args-num-gpus": int(init["num_gpus"]),
        "init-args-logging-level": "ERROR" if quiet else "WARNING",
        "init-args-log-to-driver": not quiet,
    }


def _toml_string(text: str) -> str:
    return f"'{text}'" if "'" not in text and "\n" not in text else json.dumps(text)


def _double_quoted(text: str) -> str:
    """``text`` as one shell word in double quotes (its TOML literal strings keep their ')."""
    escaped = "".join("\\" + c if c in '"\\$`' else c for c in text)
    return f'"{escaped}"'


def flwr_run_command(
    config: RunConfig, config_file: Path, overrides: list[str], run_dir: Path
) -> str:
    """The ``flwr run`` command that runs this config by hand on Flower's local simulation
    federation (the ``local`` connection): ``flora run --dry-run --runtime flower-sim`` prints
    it, with ``num-supernodes`` the config's client count."""
    federation = federation_config(config)
    run_config = {
        "config": str(config_file.resolve()),
        "set": ";".join(overrides),
        "run-dir": str(run_dir.resolve()),
    }
    sizes = " ".join(f"{k}={json.dumps(v)}" for k, v in list(federation.items())[:3])
    values = " ".join(f"{k}={_toml_string(v)}" for k, v in run_config.items() if v)
    return " ".join(
        [
            "flwr run",
            shlex.quote(str(FLOWER_APP_DIR)),
            "--federation-config",
            shlex.quote(sizes),
            "--run-config",
            _double_quoted(values),
            "--stream",
        ]
    )


def simulate(
    config: RunConfig,
    run_dir: Path,
    *,
    quiet: bool = False,
    resume: bool = False,
    cpus_per_client: int | None = None,
    round_timeout: float = 3600.0,
) -> RunResult:
    """Run ``config`` on a local Flower simulation federation; the results land in ``run_dir``."""
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise FloraError(f"{run_dir} already holds a run; use another --out or --resume")
    if resume and not (run_dir / "flower.json").is_file():
        raise FloraError(
            f"{run_dir} did not run on Flower (no flower.json); resume it without --runtime"
        )
    run_dir = run_dir.resolve()
    nodes = run_dir / "nodes"
    federation = federation_config(config, cpus_per_client, quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="flora-flower-sim-") as tmp:
        work = Path(tmp)
        resolved = work / "config.toml"
        resolved.write_text(config_toml(config), encoding="utf-8")
        run_config = {
            "config": str(resolved),
            "run-dir": str(run_dir),
            "state-dir": str(nodes),
            "round-timeout": float(round_timeout),
            "resume": resume,
            "rounds": config.federation.rounds if resume else 0,
        }
        with LocalSuperLink(work, logs=run_dir / "logs") as link:
            run_id = link.submit(FLOWER_APP_DIR, run_config, federation)
            link.follow(run_id, None if quiet else sys.stdout)
            status, details = link.status(run_id)
    summary = run_dir / "summary.json"
    if status != "finished:completed" or not summary.is_file():
        reason = details.removeprefix("Simulation failed with exception: ") or status
        resume_hint = (
            f"; continue from the last checkpoint with: flora run --resume {run_dir} "
            "--runtime flower-sim"
            if (run_dir / "checkpoints").is_dir()
            else ""
        )
        log = run_dir / "logs" / "run.log"
        raise FloraError(f"the Flower simulation stopped ({reason}; log: {log}){resume_hint}")
    shutil.rmtree(nodes, ignore_errors=True)
    data = json.loads(summary.read_text(encoding="utf-8"))
    return RunResult(
        Path(data["run_dir"]),
        data["loss_before"],
        data["loss_after"],
        data["samples"],
        data["seconds"],
    )
