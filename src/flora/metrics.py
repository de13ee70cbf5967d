"""metrics.jsonl: one JSON object a line, flushed as written, trimmed to a round on resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from flora.errors import FloraError
from flora.io import atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]


def _damaged(path: Path, what: str) -> FloraError:
    return FloraError(f"{path} is damaged ({what}): restore it from a copy, or leave this run out")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every row of a metrics file; a torn last line (a crash mid-write) is skipped. A damaged
    file (not UTF-8, a line inside it that is not a JSON row) is one FloraError naming the line.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _damaged(path, f"byte {error.start} is not UTF-8 text") from None
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise _damaged(path, f"line {number} is JSON nested too deep") from None
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was cut short
                continue
            raise _damaged(path, f"line {number} is not a JSON row ({line[:40]!r})") from None
        if not isinstance(row, dict) or not isinstance(row.get("kind"), str):
            raise _damaged(path, f"line {number} is not a JSON object with a kind")
        if not isinstance(row.get("round", 0), int) or isinstance(row.get("round"), bool):
            raise _damaged(path, f"line {number}: round {row['round']!r} is not an integer")
        rows.append(row)
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
