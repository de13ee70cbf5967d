"""metrics.jsonl: one JSON object a line, flushed as written, trimmed to a round on resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from flora.io import atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete row of a metrics file (a torn last line is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class MetricsLog:
    """Appends rows to ``path``; ``truncate(round)`` drops rows after a resumed round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def truncate(self, last_round: int, final_round: int | None = None) -> None:
        """Keep the rows of rounds <= ``last_round`` (-1: none); with ``final_round``, only rows
        of that round keep their ``final`` mark (a run extended past its old last round)."""
        rows = [r for r in read_metrics(self.path) if int(r.get("round", 0)) <= last_round]
        if final_round is not None:
            for row in rows:
                if row.get("final") and int(row.get("round", 0)) != final_round:
                    del row["final"]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_clean(row)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
