"""A SuperLink of this process's own on 127.0.0.1, driven with Flower's own commands.

``flora run --runtime flower-sim`` and the tests use it the way a user uses Flower 1.41: a
``flower-superlink`` (simulation mode: Ray runs the ClientApps of ``num-supernodes`` virtual
SuperNodes), a SuperLink connection named ``flora`` in the ``config.toml`` of a FLWR_HOME of its
own (``WORK/flwr-home``: a user's Flower configuration is never rewritten), ``flwr run``
to submit the app, ``flwr log --stream`` to follow it and ``flwr ls`` for its status. Nothing
here is Flower's deprecated in-process ``run_simulation``.

The SuperLink takes a free port, starts in its own process group and is stopped (SIGTERM, then
SIGKILL) by that group's id when the block ends, also on an exception or Ctrl-C; it never
installs an app's dependencies (``--disable-runtime-dependency-installation``: flora is
installed where it runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from flora.errors import FloraError

__all__ = ["CONNECTION", "LocalSuperLink", "flwr_command", "toml_table"]

CONNECTION = "flora"  # the SuperLink connection's name in $FLWR_HOME/config.toml


def flwr_command(name: str) -> str:
    """The path of Flower's command ``name`` (flwr, flower-superlink), next to this Python first."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise FloraError(f"`{name}` is not installed; run `pip install -e '.[flower]'`")
    return found


def _environment() -> dict[str, str]:
    """This environment, with this Python's scripts first on PATH (the SuperLink starts
    ``flower-superexec`` and ``flwr-simulation`` by name)."""
    path = os.environ.get("PATH", "")
    return os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{path}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_table(values: dict[str, Any]) -> str:
    """``key = value`` lines for Flower's ``--run-config FILE.toml`` (strings JSON-escaped,
    which TOML's basic strings read back unchanged)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def _copy(stream: subprocess.Popen[str], path: Path, out: IO[str] | None) -> None:
    assert stream.stdout is not None
    with open(path, "a", encoding="utf-8") as log:
        for line in stream.stdout:
            log.write(line)
            if out is not None:
                out.write(line)
                out.flush()


class LocalSuperLink:
    """``with LocalSuperLink(work, simulation=True) as link: run = link.submit(...)``."""

    def __init__(
        self,
        work: Path,
        *,
        simulation: bool = True,
        startup: float = 60.0,
        logs: Path | None = None,
    ) -> None:
        self.work = work
        self.home = work / "flwr-home"  # its own: a user's $FLWR_HOME/config.toml is not touched
        self.simulation = simulation
        self.startup = startup
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.logs = logs or work
        self.log_path = self.logs / "superlink.log"

    def __enter__(self) -> LocalSuperLink:
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        command = [
            flwr_command("flower-superlink"),
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.simulation:
            command.append("--simulation")
        env = self._environment() | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self._wait_until_up()
            self._write_connection()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise FloraError(
                    f"flower-superlink exited with code {self.process.returncode}; see "
                    f"{self.log_path}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise FloraError(
            f"flower-superlink did not answer in {self.startup:.0f} s; see {self.log_path}"
        )

    def _write_connection(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n',
            encoding="utf-8",
        )

    def _environment(self) -> dict[str, str]:
        return _environment() | {"FLWR_HOME": str(self.home)}

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the SuperLink's process group (the simulation processes it started too)."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # what the group left (a Ray worker)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None

    def _flwr(self, *args: str, timeout: float = 120.0) -> str:
        done = subprocess.run(
            [flwr_command("flwr"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._environment(),
        )
        if done.returncode != 0:
            last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            raise FloraError(f"`flwr {args[0]}` failed (exit {done.returncode}): {last[0]}")
        return done.stdout

    def submit(
        self, app: Path, run_config: dict[str, Any], federation_config: dict[str, Any]
    ) -> int:
        """``flwr run APP flora --run-config FILE --federation-config ...``: the run's id."""
        overrides = self.work / f"run-config-{time.time_ns()}.toml"
        overrides.write_text(toml_table(run_config), encoding="utf-8")
        args = ["run", str(app), CONNECTION, "--run-config", str(overrides), "--format", "json"]
        if federation_config:
            federation = " ".join(
                f"{k}={str(v).lower() if isinstance(v, bool) else json.dumps(v)}"
                for k, v in federation_config.items()
            )
            args += ["--federation-config", federation]
        reply = json.loads(self._flwr(*args))
        if not reply.get("success", False):
            raise FloraError(f"`flwr run` refused the app: {reply.get('error-message', reply)}")
        return int(reply["run-id"])

    def follow(self, run_id: int, out: IO[str] | None) -> None:
        """Until the run finishes: its log (``flwr log --stream``) written to ``logs/run.log``,
        and to ``out`` as it comes (None: the file alone)."""
        stream = subprocess.Popen(
            [flwr_command("flwr"), "log", str(run_id), CONNECTION, "--stream"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self._environment(),
        )
        copier = threading.Thread(target=_copy, args=(stream, self.logs / "run.log", out))
        copier.start()
        try:
            while stream.poll() is None:
                if not self.alive():
                    raise self._stopped(run_id)
                time.sleep(0.5)
        finally:
            if stream.poll() is None:
                stream.terminate()
                stream.wait(timeout=10)
            copier.join(timeout=10)
        # the stream ends with the run; the status may trail it by a moment
        while not self.status(run_id)[0].startswith("finished"):
            if not self.alive():
                raise self._stopped(run_id)
            time.sleep(0.5)

    def _stopped(self, run_id: int) -> FloraError:
        return FloraError(f"the SuperLink stopped during run {run_id}; see {self.log_path}")

    def status(self, run_id: int) -> tuple[str, str]:
        """(status, details) from ``flwr ls``, e.g. ("finished:failed", "ServerApp failed ...")."""
        text = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        reply = json.loads(text)
        run = reply["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
