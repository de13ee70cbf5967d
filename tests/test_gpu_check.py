"""scripts/gpu-check.sh and scripts/gpu_check.py, the device check, as far as a CPU can run them:
the shell script says plainly that there is no GPU, the Python part self-tests on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_shell_script_says_there_is_no_gpu() -> None:
    env = os.environ | {"PYTHON": sys.executable}
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "sees no CUDA GPU" in done.stdout and "nothing to check" in done.stdout


def test_the_check_runs_its_tiny_part_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "gpu_check.py"),
        "--cpu-only",
        "--parts",
        "tiny",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    tiny = report["tiny"]
    assert tiny["ok"] and tiny["gpu"]["after"] < tiny["gpu"]["before"]
    assert abs(tiny["gpu"]["after"] - tiny["cpu"]["after"]) < 1e-2 * tiny["cpu"]["after"]
