"""Instruction records from the shared data folder, a local JSON/JSONL file, or a dataset hub.

A record is a plain ``dict[str, str]`` with the keys ``instruction``, ``context``, ``response``
and ``category``. Only ``instruction`` and ``response`` are required in the source; a missing or
null ``context`` becomes ``""`` and a missing ``category`` becomes ``"all"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flora.errors import FloraError

__all__ = [
    "DATA_DIR_ENV",
    "DOLLY_FILE",
    "DOLLY_HUB_ID",
    "Record",
    "find_shared_data",
    "load_hub_split",
    "load_records",
]

Record = dict[str, str]

DATA_DIR_ENV = "FLORA_DATA_DIR"
"""Environment variable naming a data folder that holds e.g. ``dolly-15k/dolly-15k.jsonl``."""
DOLLY_FILE = "dolly-15k/dolly-15k.jsonl"
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"

_REQUIRED = ("instruction", "response")
_DEFAULTS = {"context": "", "category": "all"}
_LOCAL_SUFFIXES = (".json", ".jsonl")


def find_shared_data(relative: str) -> Path | None:
    """Locate ``relative`` inside the shared data folder, or return None.

    Looks in ``$FLORA_DATA_DIR/relative`` first, then in ``<ancestor>/shared/data/relative`` for
    every ancestor of the working directory and of this file (the repository sits beside
    ``shared/``, so ``../shared/data`` from its root is found either way).
    """
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        candidate = Path(env_dir).expanduser() / relative
        if candidate.is_file():
            return candidate
    starts = (Path.cwd().resolve(), Path(__file__).resolve().parent)
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data" / relative
            if candidate.is_file():
                return candidate
    return None


def load_records(source: str = "dolly", *, limit: int | None = None) -> list[Record]:
    """Load instruction records from ``source``, in the source's own order.

    ``source`` is ``"dolly"`` (the shared Dolly-15k file, else the hub id
    ``databricks/databricks-dolly-15k``), a path ending in ``.json`` or ``.jsonl``, or any
    other dataset hub id (its ``train`` split). ``limit`` keeps the first ``limit`` records;
    Dolly's file is sorted by category, so shuffle (see ``flora.data.partition``) rather than
    rely on a prefix for a category mix.
    """
    if limit is not None and limit < 1:
        raise FloraError(f"data.limit must be a positive integer or None, got {limit}")
    if source == "dolly":
        path = find_shared_data(DOLLY_FILE)
        if path is None:
            return _load_hub(DOLLY_HUB_ID, limit)
        return _load_file(path, limit)
    if source.endswith(_LOCAL_SUFFIXES) or Path(source).is_file():
        return _load_file(Path(source), limit)
    return _load_hub(source, limit)


def _load_file(path: Path, limit: int | None) -> list[Record]:
    if not path.is_file():
        raise FloraError(
            f"data.source: file {str(path)!r} does not exist; give an existing .json/.jsonl path, "
            f"'dolly', or a dataset hub id"
        )
    with path.open(encoding="utf-8") as handle:
        text = handle.read()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return _take(_json_array(text, path), limit)
    return _take(_json_lines(text, path), limit)


def _json_array(text: str, path: Path) -> Iterator[Record]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FloraError(
            f"data.source {str(path)!r}: not valid JSON at line {exc.lineno} ({exc.msg}); "
            f"fix the file or save it as JSON lines"
        ) from exc
    for number, row in enumerate(rows, start=1):
        yield _to_record(row, f"{path}: record {number}")


def _json_lines(text: str, path: Path) -> Iterator[Record]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FloraError(
                f"data.source {str(path)!r}: line {number} is not valid JSON ({exc.msg}); "
                f"each line must hold one JSON object"
            ) from exc
        yield _to_record(row, f"{path}: line {number}")


def load_hub_split(
    hub_id: str, split: str, *, what: str, fix: str, config: str | None = None
) -> Any:
    """``split`` of the dataset hub's ``hub_id`` (``config``: its subset); a FloraError that
    starts with ``what`` and ends with ``fix`` when it cannot be loaded."""
    import datasets  # deferred: importing datasets costs seconds

    names = (hub_id,) if config is None else (hub_id, config)
    try:
        return datasets.load_dataset(*names, split=split)
    except Exception as exc:  # the hub raises many types; report one with the fix
        raise FloraError(
            f"{what}: the dataset hub id {hub_id!r} could not be loaded ({exc}); {fix}"
        ) from exc


def _load_hub(hub_id: str, limit: int | None) -> list[Record]:
    fix = f"give a local .json/.jsonl path, or set {DATA_DIR_ENV} to a folder holding {DOLLY_FILE}"
    rows = load_hub_split(hub_id, "train", what="data.source", fix=fix)
    return _take(
        (_to_record(row, f"{hub_id}: row {n}") for n, row in enumerate(rows, start=1)), limit
    )


def _take(records: Iterable[Record], limit: int | None) -> list[Record]:
    out: list[Record] = []
    for record in records:
        if limit is not None and len(out) >= limit:
            break
        out.append(record)
    return out


def _to_record(row: Any, where: str) -> Record:
    """Check one raw row and fill in the optional fields."""
    if not isinstance(row, Mapping):
        raise FloraError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in _REQUIRED if row.get(key) is None]
    if missing:
        raise FloraError(
            f"{where}: missing field(s) {missing} (found {sorted(row)}); every record needs "
            f"'instruction' and 'response' ('context' and 'category' are optional)"
        )
    record: Record = {}
    for key in (*_REQUIRED, *_DEFAULTS):
        value = row.get(key)
        if value is None:
            value = _DEFAULTS[key]
        if not isinstance(value, str):
            raise FloraError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        record[key] = value
    return record
