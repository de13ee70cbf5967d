"""``--quiet``: third-party progress bars, warnings and banners off, flora's own lines kept.

The libraries read their switches from the environment when first imported (and Ray's workers
inherit it), so :func:`quieted` sets those before anything heavy is imported; for a library
already imported in this process it also flips its switch, and puts everything back on exit.
Imports no torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator

__all__ = ["QUIET_ENV", "environment", "quieted"]

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # hub downloads, and transformers' own bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",  # in the processes started from here (Ray's workers)
    "WANDB_SILENT": "true",  # output.report_to's W&B: its banner and run links
}
# loggers held at ERROR: Flower's banners and deprecation notices, Ray's, the HF libraries',
# MLflow's (output.report_to)
LOGGERS = (
    "flwr",
    "ray",
    "transformers",
    "huggingface_hub",
    "datasets",
    "accelerate",
    "peft",
    "mlflow",
)


@contextlib.contextmanager
def environment(values: dict[str, str], *, keep_set: bool = True) -> Iterator[None]:
    """``values`` in ``os.environ`` while the block runs (a variable already set is kept when
    ``keep_set``), restored afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if not (keep_set and saved[name] is not None):
            os.environ[name] = value
    try:
        yield
    finally:
        for name, before in saved.items():
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before


@contextlib.contextmanager
def quieted(enabled: bool = True) -> Iterator[None]:
    """No third-party progress bars, warnings or log lines below ERROR while the block runs."""
    if not enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(environment(QUIET_ENV))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        for name in LOGGERS:
            logger = logging.getLogger(name)
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        for undo in _loaded_switches_off():
            stack.callback(undo)
        yield


def _loaded_switches_off() -> list[Callable[[], None]]:
    """Turn off the progress bars and verbosity of the libraries already imported; the undos."""
    undo: list[Callable[[], None]] = []
    hf = sys.modules.get("transformers.utils.logging")
    if hf is not None:  # its bars, and huggingface_hub's with them
        verbosity = hf.get_verbosity()
        hf.set_verbosity_error()
        undo.append(lambda: hf.set_verbosity(verbosity))
        if hf.is_progress_bar_enabled():
            hf.disable_progress_bar()
            undo.append(hf.enable_progress_bar)
    bars = sys.modules.get("datasets.utils.tqdm")
    if bars is not None and not bars.are_progress_bars_disabled():
        bars.disable_progress_bars()
        undo.append(bars.enable_progress_bars)
    return undo
