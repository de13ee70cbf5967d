"""The runtimes a run can use, named in one table; imports nothing heavy.

A runtime is a driver ``run(config, run_dir, *, resume, quiet) -> RunResult``: the embedded one
is ``flora.engine.drive`` over :class:`flora.simulation.Embedded` (a loop over
``client_round``), ``flower-sim`` the Flower apps on Flower's simulation runtime. A new runtime
is one module with a :class:`flora.engine.Runtime` subclass (how a list of tasks becomes a list
of results) and a driver calling ``drive``; :func:`register` adds it here, and ``flora run
--runtime NAME`` offers it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora.errors import FloraError

__all__ = ["RUNTIMES", "RuntimeEntry", "driver", "owner", "register"]


@dataclass(frozen=True)
class RuntimeEntry:
    """One runtime: where its driver is and what `flora run` needs to know of it."""

    name: str
    driver: str  # "module:function", the driver ``run(config, run_dir, *, resume, quiet)``
    help: str  # one line for `flora run --help`
    install: str = ""  # what to install when its driver does not import
    marker: str = ""  # a file in a run directory that says the run is this runtime's
    flower_home: bool = False  # `flora run` gives it a private FLWR_HOME


RUNTIMES: dict[str, RuntimeEntry] = {}


def register(entry: RuntimeEntry) -> RuntimeEntry:
    """Add ``entry`` to the table (a name already taken is refused); returns it."""
    if entry.name in RUNTIMES:
        raise FloraError(f"runtime '{entry.name}' is registered already; pick another name")
    RUNTIMES[entry.name] = entry
    return entry


register(
    RuntimeEntry(
        name="embedded",
        driver="flora.simulation:run",
        help="all clients in this process, one after another (default)",
    )
)
register(
    RuntimeEntry(
        name="flower-sim",
        driver="flora.flower.sim:simulate",
        help="the Flower apps on Flower's simulation runtime",
        install="pip install -e '.[flower]'",
        marker="flower.json",
        flower_home=True,
    )
)


def driver(name: str) -> Callable[..., Any]:
    """The driver of runtime ``name``, imported; one clear error when it cannot be."""
    if name not in RUNTIMES:
        raise FloraError(f"runtime '{name}' is unknown; choose one of: {', '.join(RUNTIMES)}")
    entry = RUNTIMES[name]
    module, _, function = entry.driver.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as error:
        fix = f"; run `{entry.install}`" if entry.install else ""
        raise FloraError(f"--runtime {name} cannot start ({error}){fix}") from None


def owner(run_dir: Path) -> str | None:
    """The runtime whose marker file ``run_dir`` holds (None: no runtime marks it)."""
    for entry in RUNTIMES.values():
        if entry.marker and (run_dir / entry.marker).is_file():
            return entry.name
    return None
