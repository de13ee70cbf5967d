"""scripts/gpu-check.sh, scripts/gpu_check.py and scripts/gpu_carry.py, the device check, as far as
a CPU can run them: the shell script says plainly that there is no GPU; the carry folder builds,
fits the 64 MiB a device call takes with the working tree, installs wheel by wheel from no
index, and the check's self-test runs with the carried packages taken from the carry alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUARDED = ("datasets", "dill", "multiprocess", "flwr_datasets", "opacus")

# runs a script with the carried modules importable from the carry's target only (as on the GPU
# machine, which lacks them): an import of one found elsewhere fails
BOOT = """
import importlib.abc, importlib.machinery, runpy, sys
TARGET, GUARDED = sys.argv[1], set(sys.argv[2].split(","))
class Carried(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in GUARDED:
            spec = importlib.machinery.PathFinder.find_spec(name, [TARGET])
            if spec is None:
                raise ImportError(f"{name} is not in the carry")
            return spec
        return None
sys.meta_path.insert(0, Carried())
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


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


@pytest.fixture(scope="module")
def carry(tmp_path_factory) -> Path:
    """The carry folder, built for this interpreter (the GPU machine's is 3.12) from the
    package index, without the optional bitsandbytes."""
    out = tmp_path_factory.mktemp("carry")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    command = [sys.executable, str(ROOT / "scripts" / "gpu_carry.py"), "build", "--out", str(out)]
    done = subprocess.run(
        [*command, "--python-version", version, "--no-optional"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_carry_holds_the_wheels_and_data_and_fits_with_the_tree(carry: Path) -> None:
    manifest = json.loads((carry / "manifest.json").read_text())
    assert manifest["missing"] == [] and len(manifest["carried"]) == len(GUARDED)
    assert manifest["fits"] and manifest["carry_bytes"] + manifest["tree_bytes"] <= 64 * 2**20
    assert "dolly-15k/dolly-15k.jsonl" in manifest["data"]
    assert any(f.startswith("mmlu/test/") for f in manifest["data"])
    rows = (carry / "data" / "mmlu" / "test" / "anatomy_test.csv").read_text().splitlines()
    assert len(rows) == 1 + 4  # the header and the first questions


def test_the_self_test_runs_from_the_carry_with_no_index(carry: Path, tmp_path: Path) -> None:
    # Prepare: install wheel by wheel from no index
    site = tmp_path / "site"
    install = [sys.executable, str(ROOT / "scripts" / "gpu_carry.py"), "install"]
    done = subprocess.run(
        [*install, "--carry", str(carry), "--target", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.count(": ok") == len(GUARDED), done.stdout
    # Execute: the self-test's parts that need the carried packages, offline, from the carry
    out = tmp_path / "results"
    env = os.environ | {
        "FLORA_DATA_DIR": str(carry / "data"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": f"{site}:{ROOT / 'src'}",
    }
    script = [str(ROOT / "scripts" / "gpu_check.py"), "--cpu-only", "--out", str(out)]
    parts = ["--parts", "tiny", "privacy", "deterministic"]
    done = subprocess.run(
        [sys.executable, "-c", BOOT, str(site), ",".join(GUARDED), *script, *parts],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    # Assert: every part passed and wrote its own file
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    for part in ("tiny", "privacy", "deterministic"):
        assert report[part]["ok"] and (out / f"{part}.json").is_file(), report[part]
    tiny = report["tiny"]
    assert abs(tiny["gpu"]["after"] - tiny["cpu"]["after"]) < 1e-2 * tiny["cpu"]["after"]


def test_a_failing_part_is_written_and_the_others_go_on(tmp_path: Path, monkeypatch) -> None:
    # Prepare: the script's module, with its throughput part broken
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(module, "throughput", broken)
    # Execute
    code = module.main(
        ["--cpu-only", "--out", str(tmp_path / "r"), "--parts", "throughput", "deterministic"]
    )
    # Assert: exit 1; the failure is the part's result; the next part ran and passed
    report = json.loads((tmp_path / "r" / "gpu-check.json").read_text())
    assert code == 1
    assert report["throughput"] == json.loads((tmp_path / "r" / "throughput.json").read_text())
    assert report["throughput"]["error"] == "RuntimeError: injected"
    assert report["deterministic"]["ok"] is True
