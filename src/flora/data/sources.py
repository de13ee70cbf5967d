"""Instruction records from the shared data folder, a local file, or a dataset hub, read
through ``datasets`` (JSON, JSON lines, CSV, Parquet; a hub id with its subset and split), each
row mapped to a record by its layout (flora.data.layouts: flora/Dolly, Alpaca, chat messages,
or the columns ``data.fields`` names).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flora.data.layouts import Record, detect_layout, to_record
from flora.errors import FloraError

__all__ = [
    "DATA_DIR_ENV",
    "DOLLY_FILE",
    "DOLLY_HUB_ID",
    "FILE_BUILDERS",
    "Record",
    "find_shared_data",
    "load_hub_split",
    "load_records",
    "shared_data_roots",
]

DATA_DIR_ENV = "FLORA_DATA_DIR"
"""Environment variable naming a data folder that holds e.g. ``dolly-15k/dolly-15k.jsonl``."""
DOLLY_FILE = "dolly-15k/dolly-15k.jsonl"
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
"""A local file's suffix -> the ``datasets`` builder that reads it."""


def shared_data_roots() -> Iterator[Path]:
    """The folders that may hold the shared data, in the order they are searched:
    ``$FLORA_DATA_DIR``, then ``<ancestor>/shared/data`` for every ancestor of the working
    directory and of this file (the repository sits beside ``shared/``)."""
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        yield Path(env_dir).expanduser()
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            yield folder / "shared" / "data"


def find_shared_data(relative: str) -> Path | None:
    """Locate ``relative`` inside the shared data folder (:func:`shared_data_roots`, the first
    that holds it), or return None."""
    for root in shared_data_roots():
        if (root / relative).is_file():
            return root / relative
    return None


def load_records(
    source: str = "dolly",
    *,
    limit: int | None = None,
    subset: str = "",
    split: str = "train",
    fields: Mapping[str, str] | None = None,
    label_column: str = "category",
    natural_id_column: str = "",
) -> list[Record]:
    """Records from ``source``, in the source's own order.

    ``source`` is ``"dolly"`` (the shared Dolly-15k file, else the hub id
    ``databricks/databricks-dolly-15k``), a local ``.json``/``.jsonl``/``.csv``/``.parquet``
    file, or a dataset hub id (its ``subset``, its ``split``). ``limit`` keeps the first
    ``limit`` records. ``fields``, ``label_column`` and ``natural_id_column`` are the data
    config's (flora.data.layouts).
    """
    if limit is not None and limit < 1:
        raise FloraError(f"data.limit must be a positive integer or None, got {limit}")
    lines: list[int]
    if source == "dolly":
        path = find_shared_data(DOLLY_FILE)
        if path is None:
            rows, unit, lines = _hub_rows(DOLLY_HUB_ID, "", split), "row", []
        else:
            rows, unit, lines = _file_rows(path)
    elif Path(source).suffix in FILE_BUILDERS or Path(source).is_file():
        rows, unit, lines = _file_rows(Path(source))
    else:
        rows, unit, lines = _hub_rows(source, subset, split), "row", []
    where = source
    columns = list(getattr(rows, "column_names", None) or _first_keys(rows))
    layout = detect_layout(columns, dict(fields or {}), f"data.source {where!r}")
    if natural_id_column and natural_id_column not in columns:
        raise FloraError(
            f"data.natural_id_column {natural_id_column!r} is not a column of "
            f"{where!r}; its columns: {sorted(columns)}"
        )
    records: list[Record] = []
    for number, row in enumerate(rows, start=1):
        if limit is not None and len(records) >= limit:
            break
        place = f"line {lines[number - 1]}" if lines else f"{unit} {number}"
        records.append(to_record(row, layout, f"{where}: {place}", label_column, natural_id_column))
    return records


def _first_keys(rows: Iterable[Any]) -> list[str]:
    for row in rows:
        return list(row) if isinstance(row, Mapping) else []
    return []


def _file_rows(path: Path) -> tuple[Any, str, list[int]]:
    """A local file's rows through ``datasets``, what a row is called in errors, and for JSON
    lines each row's line number (a JSON file is checked first, so an error names the line)."""
    if not path.is_file():
        raise FloraError(
            f"data.source: file {str(path)!r} does not exist; give an existing .json, .jsonl, "
            ".csv or .parquet path, 'dolly', or a dataset hub id"
        )
    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise FloraError(
            f"data.source {str(path)!r}: unknown file type {path.suffix!r}; use one "
            f"of {sorted(FILE_BUILDERS)}"
        )
    import datasets  # deferred: importing datasets costs seconds

    unit, lines = "row", list[int]()
    if builder == "json":
        unit, lines = _first_bad_json(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train"), unit, lines
    except Exception as exc:  # datasets raises many types: one line, with its own words
        raise FloraError(
            f"data.source {str(path)!r}: datasets could not read it as {builder} "
            f"({type(exc).__name__}: {(str(exc).splitlines() or ['no message'])[0][:200]})"
        ) from None


MAX_LINE = 16 * 2**20  # characters in one JSON line: one example, never a whole dataset
MAX_JSON_ARRAY = 512 * 2**20  # bytes of a .json array, which is parsed whole


def _first_bad_json(path: Path) -> tuple[str, list[int]]:
    """Raise a FloraError naming the first line (JSON lines) or record (a JSON array) that is
    not a JSON object; otherwise return which of the two a row is, and the rows' line numbers
    (JSON lines). JSON lines are read one line at a time (a line over ``MAX_LINE`` characters is
    refused without reading it whole); a JSON array over ``MAX_JSON_ARRAY`` bytes is refused."""
    where = f"data.source {str(path)!r}"
    with path.open("rb") as probe:
        head = probe.read(4096).decode("utf-8", errors="ignore").lstrip()
    if path.suffix == ".json" and head.startswith("["):
        return _json_array(path, where)
    numbers: list[int] = []
    with path.open(encoding="utf-8", newline="") as file:
        number = 0
        while True:
            number += 1
            try:
                line = file.readline(MAX_LINE + 1)
            except UnicodeDecodeError:
                raise FloraError(
                    f"{where}: line {number} is not UTF-8 text; save the file as UTF-8"
                ) from None
            if not line:
                break
            if len(line) > MAX_LINE:
                raise FloraError(
                    f"{where}: line {number} is longer than {MAX_LINE // 2**20} MiB of text; "
                    "put one example per line (JSON lines)"
                )
            if not line.strip():
                continue
            _object_line(line, number, where)
            numbers.append(number)
    if not numbers:
        raise FloraError(f"{where}: the file is empty; give it at least one example")
    return "line", numbers


def _object_line(line: str, number: int, where: str) -> None:
    """One JSON line that must hold a JSON object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        fix = "each line must hold one JSON object"
        raise FloraError(f"{where}: line {number} is not valid JSON ({exc.msg}); {fix}") from None
    except RecursionError:
        raise FloraError(f"{where}: line {number} is nested too deeply to read") from None
    if not isinstance(row, dict):
        kind = type(row).__name__
        raise FloraError(f"{where}: line {number}: expected a JSON object, got {kind}")


def _json_array(path: Path, where: str) -> tuple[str, list[int]]:
    """A .json file holding one array of objects, parsed whole (bounded in size)."""
    size = path.stat().st_size
    if size > MAX_JSON_ARRAY:
        raise FloraError(
            f"{where}: a JSON array of {size / 2**20:.0f} MiB is parsed whole; save it as JSON "
            f"lines (.jsonl, read a line at a time) or keep it under {MAX_JSON_ARRAY // 2**20} MiB"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise FloraError(
            f"{where}: byte {error.start} is not UTF-8 text; save it as UTF-8"
        ) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        fix = "fix the file or save it as JSON lines"
        raise FloraError(
            f"{where}: not valid JSON at line {exc.lineno} ({exc.msg}); {fix}"
        ) from None
    except RecursionError:
        raise FloraError(f"{where}: nested too deeply to read; one object per row") from None
    if not rows:
        raise FloraError(f"{where}: the file is empty; give it at least one example")
    unit, numbers = "record", list(range(1, len(rows) + 1))
    for number, row in zip(numbers, rows, strict=True):
        if not isinstance(row, dict):
            kind = type(row).__name__
            raise FloraError(f"{where}: {unit} {number}: expected a JSON object, got {kind}")
    return unit, []


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


def _hub_rows(hub_id: str, subset: str, split: str) -> Any:
    fix = (
        f"give a local .json/.jsonl/.csv/.parquet path, or set {DATA_DIR_ENV} to a folder "
        f"holding {DOLLY_FILE}"
    )
    return load_hub_split(hub_id, split, what="data.source", fix=fix, config=subset or None)
