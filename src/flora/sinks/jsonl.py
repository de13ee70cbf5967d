"""metrics.jsonl as a sink: every row, written first, the run's record of truth.

flora.metrics does the writing (one JSON object a line, flushed and synced as written; a resume
truncates it to the checkpoint's round). Its errors are the run's: a row that cannot reach
metrics.jsonl stops the run, where a tracker that fails is only dropped.
"""

from __future__ import annotations

from flora.metrics import MetricsLog

__all__ = ["JsonlSink"]


class JsonlSink(MetricsLog):
    """metrics.jsonl: ``write``, ``truncate`` (resume) and ``path`` from MetricsLog."""

    def close(self) -> None:
        """Nothing to release: each row is written, flushed and synced with its own open."""
