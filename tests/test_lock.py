"""The locked install (constraints.lock, scripts/lock.sh): this environment holds exactly the
locked versions, and pip check is clean. A difference fails here with the command that fixes it:
`make clean test` reinstalls from the lock, `make lock` regenerates it."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNLOCKED = {"torch", "flora-lora", "pip", "setuptools", "wheel"}  # torch: constraints.txt


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_name(name)] = version.strip()
    return pins


def test_every_installed_distribution_is_at_its_locked_version():
    locked = _locked()
    # what this environment installed: its site-packages alone (a test, or a tool a test runs,
    # may put other folders on sys.path for a while)
    sites = {str(Path(sysconfig.get_paths()[k]).resolve()) for k in ("purelib", "platlib")}
    installed = {
        _name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions(path=sorted(sites))
    }
    differ = {n: (v, locked[n]) for n, v in installed.items() if n in locked and locked[n] != v}
    extra = sorted(n for n in installed if n not in locked and n not in UNLOCKED)
    missing = sorted(n for n in locked if n not in installed)
    fix = "reinstall with `make clean test`, or regenerate the lock with `make lock`"
    assert not differ, f"installed (locked) versions differ: {differ}; {fix}"
    assert not extra, f"installed but not locked: {extra}; {fix}"
    assert not missing, f"locked but not installed: {missing}; {fix}"


def test_the_lock_pins_every_line_exactly_and_leaves_torch_to_constraints():
    pins = _locked()
    assert len(pins) > 50 and "torch" not in pins and "flora-lora" not in pins
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    for line in (ROOT / "constraints.lock").read_text().splitlines():
        assert line.startswith("#") or re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^\s;]+", line), line


def test_pip_check_is_clean():
    done = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
