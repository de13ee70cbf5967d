"""``flora run --runtime flower-sim``: the Flower apps on Flower's simulation runtime, in-process.

``flwr.simulation.run_simulation`` starts one virtual SuperNode per client (node config
``partition-id`` = client index) and runs the ClientApp on a pool of Ray actors, each using
``cpus_per_client`` cores. The node state (each partition's base snapshots and data) lives in
``RUN_DIR/nodes/`` and is removed when the run succeeds; ``resume`` continues a run that stopped
after a checkpoint, its nodes going on from the state they kept there. Flower's own state goes
to a temporary FLWR_HOME, with its telemetry off (flora.flower.home).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from flora.config import RunConfig
from flora.errors import FloraError
from flora.flower.client_app import make_client_app
from flora.flower.home import own_flower_home
from flora.flower.server_app import make_server_app
from flora.outputs import RunResult

__all__ = ["backend_config", "simulate"]


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


def simulate(
    config: RunConfig,
    run_dir: Path,
    *,
    quiet: bool = False,
    resume: bool = False,
    cpus_per_client: int | None = None,
    round_timeout: float = 3600.0,
) -> RunResult:
    """Run ``config`` on the Flower simulation runtime; the results land in ``run_dir``."""
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise FloraError(f"{run_dir} already holds a run; use another --out or --resume")
    if resume and not (run_dir / "flower.json").is_file():
        raise FloraError(
            f"{run_dir} did not run on Flower (no flower.json); resume it without --runtime"
        )
    nodes = run_dir / "nodes"
    fed = config.federation
    options = {"round-timeout": round_timeout, "resume": resume}
    server_app = make_server_app(config, run_dir, options)  # type: ignore[arg-type]
    backend = backend_config(config, cpus_per_client)
    if quiet:  # no output from the ClientApp actors (their errors come back in the replies)
        backend["init_args"]["log_to_driver"] = False
    logger = logging.getLogger("flwr")
    level = logger.level
    if quiet:  # not even Flower's deprecation banner
        logger.setLevel(logging.ERROR)
    try:
        with own_flower_home():  # flora run entered it before flwr's import (telemetry) too
            run_simulation(
                server_app,
                make_client_app(nodes),
                num_supernodes=1 if fed.centralized else fed.num_clients,
                backend_config=backend,
                verbose_logging=False,
            )
    except FloraError:
        raise
    except Exception as error:  # the ServerApp's own exception, re-raised by run_simulation
        raise FloraError(
            f"the Flower simulation stopped ({type(error).__name__}: {error}); continue from the "
            f"last checkpoint with: flora run --resume {run_dir} --runtime flower-sim"
        ) from error
    finally:
        logger.setLevel(level)
    summary = run_dir / "summary.json"
    if not summary.is_file():
        raise FloraError("the Flower simulation ended without a result; see the log above")
    shutil.rmtree(nodes, ignore_errors=True)
    data = json.loads(summary.read_text(encoding="utf-8"))
    return RunResult(
        Path(data["run_dir"]),
        data["loss_before"],
        data["loss_after"],
        data["samples"],
        data["seconds"],
    )
