"""docs/config.md is generated from flora.config's dataclasses and kept in sync."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from flora.config import RunConfig
from flora.config_doc import field_comments, render

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


def test_comments_above_beside_and_inside_a_field_are_read():
    source = """
@dataclass
class Section:
    plain: int = 1
    # two lines
    # above
    above: int = 2
    beside: str = "x"  # beside it
    wrapped: str = (
        "y"  # inside the parentheses
    )
    # a comment, then a blank line: not the next field's

    gap: int = 3  # its own
"""
    comments = field_comments(source)
    assert comments[("Section", "plain")] == ""
    assert comments[("Section", "above")] == "two lines above"
    assert comments[("Section", "beside")] == "beside it"
    assert comments[("Section", "wrapped")] == "inside the parentheses"
    assert comments[("Section", "gap")] == "its own"
