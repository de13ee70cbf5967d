"""docs/config.md, the reference of every config key, generated from flora.config's dataclasses.

    python -m flora.config_doc > docs/config.md

Each key's description is the ``#`` comment written beside its field in config.py (on the
field's lines, or the comment lines right above it), read from the source with ``tokenize``;
its type and default come from the dataclass. tests/test_config_doc.py fails when the file is
out of date.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import tokenize
import typing
from typing import Any

from flora import config as config_module
from flora.config import RunConfig

__all__ = ["field_comments", "render"]

_HEADER = """\
# Config reference

Every key of a flora run config (a TOML file; `flora configs list` shows the shipped ones), with
its type, its default and what it does. A key given on the command line goes as
`--set section.key=value` (the value parsed as TOML). Generated from the dataclasses in
`src/flora/config.py` by `python -m flora.config_doc > docs/config.md`; do not edit by hand.
"""


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the field's comment text, for every dataclass field in
    ``source``: the comment lines right above the field, then those on its own lines."""
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()  # lines holding code (not only a comment)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    found: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above: list[str] = []
            line = item.lineno - 1
            while line in comments and line not in code_lines:
                above.insert(0, comments[line])
                line -= 1
            end = item.end_lineno or item.lineno
            beside = [comments[n] for n in range(item.lineno, end + 1) if n in comments]
            found[(node.name, item.target.id)] = " ".join(above + beside)
    return found


def _toml(value: Any) -> str:
    """A default as it would be written in TOML ("unset" for None)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f.name
    return f.default_factory()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _section(cls: type, title: str, comments: dict[tuple[str, str], str]) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = [f"## {title}", ""]
    doc = inspect.getdoc(cls) or ""
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses' generated signature
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue  # a section of its own
        kind = re.sub(r"dict\[str, (\w+)\]", r"table of \1", str(f.type))
        kind = kind.replace("table of Any", "table")
        row = [f"`{f.name}`", f"`{kind}`", f"`{_toml(_default(f))}`",
               comments.get((cls.__name__, f.name), "")]  # fmt: skip
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    return [*lines, ""]


def render() -> str:
    """The whole of docs/config.md."""
    comments = field_comments(inspect.getsource(config_module))
    lines = [_HEADER, *_section(RunConfig, "Top level (no section)", comments)]
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        section = hints[f.name]
        if dataclasses.is_dataclass(section):
            lines += _section(typing.cast(type, section), f"[{f.name}]", comments)
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render(), end="")
