"""One client shifted to a single category: sizes kept, every row placed once, errors named."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from flora.config import load_config
from flora.data.federated import prepare_data
from flora.data.shift import shift_to_category
from flora.errors import FloraError

LABELS = ["a", "b", "c"] * 10  # 30 rows, 10 of each


def test_the_shifted_client_holds_one_category_and_the_others_keep_their_sizes():
    parts = [list(range(0, 12)), list(range(12, 21)), list(range(21, 30))]
    shifted = shift_to_category(parts, LABELS, 0, "b", seed=0)
    assert {LABELS[i] for i in shifted[0]} == {"b"}
    assert [len(p) for p in shifted] == [10, 10, 10]  # 10 "b" in all: 2 left over
    assert sorted(i for p in shifted for i in p) == list(range(30))  # every row, once
    small = shift_to_category([[0, 1, 2], list(range(3, 30))], LABELS, 0, "c", seed=0)
    assert {LABELS[i] for i in small[0]} == {"c"} and len(small[0]) == 3  # swapped one for one
    assert len(small[1]) == 27 and sorted(small[0] + small[1]) == list(range(30))
    assert shift_to_category(parts, LABELS, 1, "a", seed=4) == shift_to_category(
        parts, LABELS, 1, "a", seed=4
    )  # seeded


def test_bad_shift_settings_name_the_field():
    with pytest.raises(FloraError, match="data.shift_category = 'z'.*one of \\['a', 'b', 'c'\\]"):
        shift_to_category([[0], [1, 2]], LABELS[:3], 0, "z", seed=0)
    with pytest.raises(FloraError, match="data.shift_client = 5"):
        shift_to_category([[0], [1, 2]], LABELS[:3], 5, "a", seed=0)
    with pytest.raises(FloraError, match="data.shift_category"):
        load_config("configs/tiny.toml", ["data.shift_client=0"])
    with pytest.raises(FloraError, match="data.shift_client"):
        load_config("configs/tiny.toml", ["data.shift_client=9", "data.shift_category='a'"])


def test_prepare_data_shifts_one_client(tmp_path, smollm2_tokenizer: Any):
    kinds = ["open_qa", "summarization", "brainstorming"]
    rows = [
        {
            "instruction": f"Question {i}",
            "output": f"Answer {i}",
            "input": "",
            "category": kinds[i % 3],
        }
        for i in range(90)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    options: dict[str, Any] = {
        "source": str(path),
        "tokenizer": smollm2_tokenizer,
        "template": "chat",
        "max_length": 64,
        "limit": 0,
        "heldout": 9,
        "scheme": "iid",
        "num_clients": 3,
        "seed": 0,
    }
    plain = prepare_data(**options)
    data = prepare_data(**options, shift_client=2, shift_category="summarization")
    total = sum(e["category"] == "summarization" for c in plain.clients for e in c)
    assert Counter(e["category"] for e in data.clients[2]) == {
        "summarization": min(total, len(plain.clients[2]))
    }
    assert sum(map(len, data.clients)) == sum(map(len, plain.clients))
    assert data.heldout == plain.heldout  # the held-out set is not touched
