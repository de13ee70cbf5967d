"""Every row to metrics.jsonl first, then to each tracker of ``output.report_to``.

:class:`MetricSinks` stands where flora.outputs had a MetricsLog (``write``, ``truncate``,
``path``), so the row writers need not know the sinks exist. The trackers open at the first row
written, after a resume has truncated metrics.jsonl, and are handed the rows it kept. A tracker
that fails to open, write or close is dropped with one warning line; metrics.jsonl still has
every row and the run goes on.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from flora.metrics import read_metrics
from flora.sinks import SINKS, Row, Sink, check_trackers
from flora.sinks.jsonl import JsonlSink

__all__ = ["MetricSinks"]


class MetricSinks:
    """metrics.jsonl (the record of truth) and the trackers named in ``report_to``."""

    def __init__(self, run_dir: Path, report_to: list[str], settings: Row) -> None:
        """``settings``: config.json's settings, which the trackers record with the run."""
        check_trackers(report_to)
        self.run_dir = run_dir
        self.jsonl = JsonlSink(run_dir / "metrics.jsonl")
        self._names = list(report_to)
        self._settings = settings
        self._open: dict[str, Sink] | None = None  # None: not opened yet

    @property
    def path(self) -> Path:
        return self.jsonl.path

    def truncate(self, last_round: int, final_round: int | None = None) -> None:
        """Drop metrics.jsonl's rows after ``last_round`` (flora.metrics.MetricsLog.truncate);
        trackers opened already are reopened at the next row, with the rows kept."""
        self.jsonl.truncate(last_round, final_round)
        if self._open:
            self._close_trackers()
            self._open = None

    def write(self, row: Row) -> None:
        if self._open is None:
            self._open = self._start()
        self.jsonl.write(row)  # first: a row lost here stops the run
        for name, sink in list(self._open.items()):
            try:
                sink.write(row)
            except Exception as error:
                self._drop(name, "write a row", error)

    def close(self) -> None:
        """Close every tracker (a failure is a warning); later rows go to metrics.jsonl only."""
        if self._open:
            self._close_trackers()
        self._open = {}

    def _start(self) -> dict[str, Sink]:
        kept = read_metrics(self.jsonl.path) if self._names else []
        opened: dict[str, Sink] = {}
        for name in self._names:
            try:
                opened[name] = SINKS[name].open(self.run_dir, self._settings, kept)
            except Exception as error:
                self._warn(name, "open", error)
        return opened

    def _close_trackers(self) -> None:
        assert self._open is not None
        for name, sink in list(self._open.items()):
            try:
                sink.close()
            except Exception as error:
                self._warn(name, "close", error)
        self._open.clear()

    def _drop(self, name: str, what: str, error: Exception) -> None:
        assert self._open is not None
        sink = self._open.pop(name)
        self._warn(name, what, error)
        with contextlib.suppress(Exception):  # the failure that matters is reported
            sink.close()

    @staticmethod
    def _warn(name: str, what: str, error: Exception) -> None:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        print(
            f"flora: warning: output.report_to {name!r} failed to {what} "
            f"({type(error).__name__}: {first}); it gets no more rows, metrics.jsonl has them all",
            file=sys.stderr,
        )
