"""docs/config.md is generated from flora.config's dataclasses (each field's help) and kept in
sync."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from flora.config import RunConfig
from flora.config_doc import field_help, render

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/config.md is out of date: run `python -m flora.config_doc > docs/config.md`"
    )


def test_every_key_has_a_row():
    text = render()
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        section = hints[f.name]
        if not dataclasses.is_dataclass(section):
            assert f"| `{f.name}` |" in text
            continue
        assert f"## [{f.name}]" in text
        for key in dataclasses.fields(section):
            assert f"| `{key.name}` |" in text.split(f"## [{f.name}]")[1].split("\n## ")[0]


def test_every_key_has_help_beside_its_field():
    """Regression: [privacy]'s dataclass lives in privacy/config.py, whose comments the generator
    never read, so docs/config.md showed the whole section with empty descriptions."""
    hints = typing.get_type_hints(RunConfig)
    keys: list[tuple[str, dataclasses.Field]] = []
    for f in dataclasses.fields(RunConfig):
        section = hints[f.name]
        if dataclasses.is_dataclass(section):
            keys += [(f"{f.name}.{key.name}", key) for key in dataclasses.fields(section)]
        else:
            keys.append((f.name, f))
    missing = [name for name, f in keys if not field_help(f)]
    assert not missing, f"write field(..., metadata={{'help': ...}}) for {missing}"


def test_no_description_is_empty():
    rows = [line for line in render().splitlines() if line.startswith("| `")]
    assert len(rows) > 50
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)[1:-1]  # key, type, default, description
        assert len(cells) == 4 and cells[3].strip(), row
