"""Any common layout, read through datasets: Alpaca, chat messages, CSV and Parquet files, a
field mapping, any label column, natural ids, a hub subset and split (flora.data.layouts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flora.data import load_records
from flora.errors import FloraError

WANT = [
    {"instruction": "Add 2 and 2", "context": "", "response": "4", "category": "math"},
    {"instruction": "Summarise", "context": "A long text.", "response": "Short.", "category": "x"},
]


def jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_alpaca_files_are_recognised(tmp_path):
    rows = [
        {"instruction": "Add 2 and 2", "input": "", "output": "4", "category": "math"},
        {"instruction": "Summarise", "input": "A long text.", "output": "Short.", "category": "x"},
    ]
    assert load_records(jsonl(tmp_path / "a.jsonl", rows)) == WANT


def test_chat_messages_are_recognised(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Add 2 and 2"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3?"},
            ],
            "category": "math",
        },
        {
            "messages": [
                {"role": "user", "content": "Summarise"},
                {"role": "assistant", "content": "Short."},
            ]
        },
    ]
    records = load_records(jsonl(tmp_path / "c.jsonl", rows))
    assert [(r["instruction"], r["response"], r["category"]) for r in records] == [
        ("Add 2 and 2", "4", "math"),
        ("Summarise", "Short.", "all"),
    ]


def test_a_chat_row_without_an_answer_names_the_line(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(FloraError, match="line 1: messages hold no user turn followed by"):
        load_records(jsonl(tmp_path / "c.jsonl", rows))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_files_with_a_field_mapping(tmp_path, suffix):
    import datasets

    table = datasets.Dataset.from_dict(
        {
            "question": ["Add 2 and 2", "Summarise"],
            "passage": [None, "A long text."],
            "answer": ["4", "Short."],
            "topic": ["math", "x"],
        }
    )
    path = tmp_path / f"rows{suffix}"
    table.to_csv(str(path), index=False) if suffix == ".csv" else table.to_parquet(str(path))
    fields = {"instruction": "question", "context": "passage", "response": "answer"}
    assert load_records(str(path), fields=fields, label_column="topic") == WANT


def test_any_column_is_the_label_and_a_natural_id_is_kept(tmp_path):
    rows = [
        {"instruction": "a", "response": "b", "lang": "fr", "user": 7},
        {"instruction": "c", "response": "d", "lang": "de", "user": 8},
    ]
    records = load_records(
        jsonl(tmp_path / "r.jsonl", rows), label_column="lang", natural_id_column="user"
    )
    assert [(r["category"], r["natural_id"]) for r in records] == [("fr", "7"), ("de", "8")]


@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        ([{"q": "a", "a": "b"}], {}, r"no known layout in columns \['a', 'q'\].*data\.fields"),
        (
            [{"q": "a", "a": "b"}],
            {"fields": {"instruction": "q", "response": "x"}},
            r"data\.fields names column\(s\) it lacks \(response = 'x'\)",
        ),
        (
            [{"q": "a", "a": "b"}],
            {"fields": {"question": "q"}},
            r"unknown field\(s\) \['question'\]",
        ),
        (
            [{"instruction": "a", "response": "b"}],
            {"natural_id_column": "user"},
            r"data\.natural_id_column 'user' is not a column",
        ),
    ],
)
def test_layout_errors_are_one_line_with_the_fix(tmp_path, rows, options, message):
    with pytest.raises(FloraError, match=message):
        load_records(jsonl(tmp_path / "r.jsonl", rows), **options)


def test_a_hub_subset_and_split_are_passed_on(monkeypatch):
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(*names: str, split: str) -> list[dict[str, str]]:
        calls.append((*names, split))
        return [{"instruction": "a", "output": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("someone/set", subset="en", split="validation")
    assert calls == [("someone/set", "en", "validation")]
    assert records[0]["response"] == "b"
