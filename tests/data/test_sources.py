"""Loading records: the shared Dolly file, local JSON/JSONL files, hub ids, and their errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flora.data import DOLLY_FILE, find_shared_data, load_records
from flora.errors import FloraError

ROWS: list[dict[str, Any]] = [
    {"instruction": "Add 2 and 2", "context": "", "response": "4", "category": "math"},
    {"instruction": "Name a colour", "response": "Blue"},
    {"instruction": "Summarise", "context": None, "response": "Short.", "category": "sum"},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_dolly_has_15011_rows_in_8_categories() -> None:
    if find_shared_data(DOLLY_FILE) is None:
        pytest.skip(f"shared data file {DOLLY_FILE} not found (set FLORA_DATA_DIR)")

    records = load_records("dolly")

    assert len(records) == 15_011
    categories = Counter(record["category"] for record in records)
    assert len(categories) == 8
    assert categories["open_qa"] == 3_742


def test_find_shared_data_prefers_the_env_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    target = tmp_path / "dolly-15k" / "dolly-15k.jsonl"
    target.parent.mkdir()
    write_jsonl(target, ROWS)
    monkeypatch.setenv("FLORA_DATA_DIR", str(tmp_path))

    # Execute
    found = find_shared_data(DOLLY_FILE)
    records = load_records("dolly")

    # Assert
    assert found == target
    assert len(records) == len(ROWS)


def test_find_shared_data_returns_none_when_absent() -> None:
    assert find_shared_data("no-such-set/nothing.jsonl") is None


def test_jsonl_fills_optional_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)

    records = load_records(str(path))

    assert records == [
        {"instruction": "Add 2 and 2", "response": "4", "context": "", "category": "math"},
        {"instruction": "Name a colour", "response": "Blue", "context": "", "category": "all"},
        {"instruction": "Summarise", "response": "Short.", "context": "", "category": "sum"},
    ]


@pytest.mark.parametrize(("limit", "expected"), [(1, 1), (2, 2), (10, 3), (None, 3)])
def test_limit_keeps_a_prefix(tmp_path: Path, limit: int | None, expected: int) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)

    records = load_records(str(path), limit=limit)

    assert [r["instruction"] for r in records] == [r["instruction"] for r in ROWS[:expected]]


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")

    records = load_records(str(path))

    assert [r["response"] for r in records] == ["4", "Blue", "Short."]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"instruction": "a", "response": "b"}', "", "{not json"], "line 3"),
        (['{"instruction": "a", "response": "b"}', '{"instruction": "a"}'], "line 2"),
        (['{"instruction": "a", "response": "b"}', '{"context": "c", "response": "r"}'], "line 2"),
        (['["a list"]'], "line 1"),
        (['{"instruction": 3, "response": "b"}'], "'instruction' must be a string"),
    ],
    ids=["unparsable", "no-response", "no-instruction", "not-an-object", "not-a-string"],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(FloraError, match=message):
        load_records(str(path))


def test_missing_file_is_a_flora_error(tmp_path: Path) -> None:
    with pytest.raises(FloraError, match="does not exist"):
        load_records(str(tmp_path / "absent.jsonl"))


@pytest.mark.parametrize("limit", [0, -3])
def test_bad_limit(limit: int) -> None:
    with pytest.raises(FloraError, match=r"data\.limit"):
        load_records("dolly", limit=limit)


def test_other_strings_are_hub_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a fake hub that records what it was asked for
    import datasets

    calls: list[tuple[str, str]] = []

    def fake_load_dataset(hub_id: str, split: str) -> list[dict[str, Any]]:
        calls.append((hub_id, split))
        return ROWS

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)

    # Execute
    records = load_records("someone/some-set", limit=2)

    # Assert
    assert calls == [("someone/some-set", "train")]
    assert [r["category"] for r in records] == ["math", "all"]


def test_hub_failure_is_a_flora_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(hub_id: str, split: str) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)

    with pytest.raises(FloraError, match=r"someone/some-set.*no network"):
        load_records("someone/some-set")
