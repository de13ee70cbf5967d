"""What the deployment tests check after a script stopped what it started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def alive_in_groups(groups: set[int]) -> list[str]:
    """Processes (not zombies) still in the given process groups."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp in groups and state != "Z":
            alive.append(stat.parent.name)
    return alive


def deploy(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """scripts/flower-deploy.sh with ``args`` into ``tmp/run``, this venv's tools first on PATH
    and its temporary directory (FLWR_HOME, keys, certificates) under ``tmp``."""
    run_dir = tmp / "run"
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp),
    }
    command = ["bash", "scripts/flower-deploy.sh", *args, "-o", str(run_dir), "-t", "240"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return done, run_dir
