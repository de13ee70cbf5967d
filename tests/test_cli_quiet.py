"""`--quiet` prints only flora's result lines, on both runtimes; `--runtime flower-sim` keeps
Flower's state out of $HOME (a FLWR_HOME of its own) with its telemetry off."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flora.flower.home import own_flower_home
from flora.quiet import QUIET_ENV, quieted

ROOT = Path(__file__).resolve().parents[1]


def _quiet_run(tmp_path: Path, *runtime: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`flora run tiny --quiet` in a fresh process, with HOME an empty directory and every
    other cache named outside it (the HF hub's and datasets', matplotlib's, flora's)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "HF_", "MPL"))}
    env |= {
        "HOME": str(home),
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
        "FLORA_CACHE": str(tmp_path / "cache"),
    }
    command = [
        sys.executable,
        "-m",
        "flora.cli",
        "run",
        *runtime,
        "tiny",
        "--quiet",
        "--set",
        "eval.samples=1",
        "--out",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done, home


def _assert_only_flora_lines(done: subprocess.CompletedProcess) -> None:
    # the result lines, in order; the sample answers (random tokens) may span lines
    pattern = (
        r"\nresults in .*\nheld-out loss: before .*\n\nthe 1 of 1 held-out sample answers "
        r"that changed most .*\n\nprompt: .*\nbefore: (.|\n)*after:  "
    )
    assert re.fullmatch(pattern + r"(.|\n)*", done.stdout), done.stdout
    assert done.stderr == "", done.stderr[-2000:]  # no progress bar, warning or banner


def test_quiet_prints_only_the_result_lines(tmp_path):
    done, _ = _quiet_run(tmp_path)
    _assert_only_flora_lines(done)


def test_flower_sim_quiet_writes_nothing_under_home(tmp_path):
    pytest.importorskip("flwr", reason="needs `pip install -e '.[flower]'`")
    done, home = _quiet_run(tmp_path, "--runtime", "flower-sim")
    _assert_only_flora_lines(done)
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == []  # no ~/.flwr/source


def test_own_flower_home_is_temporary_and_keeps_a_chosen_one(monkeypatch):
    monkeypatch.delenv("FLWR_HOME", raising=False)
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    with own_flower_home():
        home = Path(os.environ["FLWR_HOME"])
        assert home.is_dir() and os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    assert not home.exists() and "FLWR_HOME" not in os.environ
    assert "FLWR_TELEMETRY_ENABLED" not in os.environ
    monkeypatch.setenv("FLWR_HOME", "/chosen")
    with own_flower_home():
        assert os.environ["FLWR_HOME"] == "/chosen"


def test_quieted_puts_everything_back(monkeypatch):
    from transformers.utils import logging as hf_logging

    for name in QUIET_ENV:
        monkeypatch.delenv(name, raising=False)
    flwr = logging.getLogger("flwr")
    level, verbosity = flwr.level, hf_logging.get_verbosity()
    hf_logging.enable_progress_bar()
    with quieted():
        assert not hf_logging.is_progress_bar_enabled()
        assert flwr.level == logging.ERROR and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == verbosity
    assert flwr.level == level and not set(QUIET_ENV) & set(os.environ)
