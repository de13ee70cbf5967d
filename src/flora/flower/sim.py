"""``flora run --runtime flower-sim``: the Flower apps on Flower's simulation runtime, in-process.

``flwr.simulation.run_simulation`` starts one virtual SuperNode per client (node config
``partition-id`` = client index) and runs the ClientApp on a pool of Ray actors, each using
``cpus_per_client`` cores. The node state (each partition's base snapshots and data) lives in
``RUN_DIR/nodes/`` and is removed when the run succeeds; ``resume`` continues a run that stopped
after a checkpoint, its nodes going on from the state they kept there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from flwr.simulation import run_simulation

from flora.config import RunConfig
from flora.errors import FloraError
from flora.flower.client_app import make_client_app
from flora.flower.server_app import make_server_app
from flora.outputs import RunResult

__all__ = ["simulate"]


def simulate(
    config: RunConfig,
    run_dir: Path,
    *,
    quiet: bool = False,
    resume: bool = False,
    cpus_per_client: int = 1,
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
    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "ERROR"},
    }
    logger = logging.getLogger("flwr")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        run_simulation(
            server_app,
            make_client_app(nodes),
            num_supernodes=1 if fed.centralized else fed.num_clients,
            backend_config=backend,  # type: ignore[arg-type]
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
        Path(data["run_dir"]), data["loss_before"], data["loss_after"], data["samples"],
        data["seconds"],
    )  # fmt: skip
