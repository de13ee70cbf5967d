"""prepare_data end to end over a file: one client per natural id, and labels from any column."""

from __future__ import annotations

import json
import re
from typing import Any

from flora.data.federated import prepare_data


def test_natural_ids_give_one_client_each(tmp_path, smollm2_tokenizer: Any):
    rows = [
        {
            "instruction": f"Question {i}",
            "output": f"Answer {i}",
            "input": "",
            "hospital": f"site-{i % 3}",
            "ward": "icu" if i % 2 else "er",
        }
        for i in range(60)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = prepare_data(
        source=str(path),
        tokenizer=smollm2_tokenizer,
        template="chat",
        max_length=64,
        limit=0,
        heldout=6,
        scheme="natural-id",
        num_clients=3,
        seed=0,
        label_column="ward",
        natural_id_column="hospital",
    )

    def site(example: dict[str, Any]) -> int:
        text = smollm2_tokenizer.decode(example["input_ids"])
        return int(re.search(r"Question (\d+)", text).group(1)) % 3  # type: ignore[union-attr]

    assert [{site(e) for e in part} for part in data.clients] == [{0}, {1}, {2}]  # sorted ids
    assert sum(len(part) for part in data.clients) == 54
    labels = {e["category"] for part in data.clients for e in part}
    assert labels == {"icu", "er"}  # the label column is ward, not a missing "category"
    assert "icu" in data.table and "er" in data.table
