"""docs/config.md, the reference of every config key, generated from flora.config's dataclasses.

    python -m flora.config_doc > docs/config.md

Each key's description is its field's help, written beside it as
``field(..., metadata={"help": ...})`` (in config.py, or privacy/config.py for ``[privacy]``);
its type and default come from the dataclass, a section's introduction from its docstring.
tests/test_config_doc.py fails when the file is out of date or a key has no help.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from typing import Any

from flora.config import RunConfig

__all__ = ["field_help", "render"]

_HEADER = """\
# Config reference

Every key of a flora run config (a TOML file; `flora configs list` shows the shipped ones), with
its type, its default and what it does. A key given on the command line goes as
`--set section.key=value` (the value parsed as TOML). Generated from the help beside each field
of the dataclasses in `src/flora/config.py` and `src/flora/privacy/config.py` by
`python -m flora.config_doc > docs/config.md`; do not edit by hand.
"""


def field_help(f: dataclasses.Field[Any]) -> str:
    """A config field's help: ``field(..., metadata={"help": ...})``, "" where it has none."""
    return " ".join(str(f.metadata.get("help", "")).split())


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


def _section(cls: type, title: str) -> list[str]:
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
        row = [f"`{f.name}`", f"`{kind}`", f"`{_toml(_default(f))}`", field_help(f)]
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    return [*lines, ""]


def render() -> str:
    """The whole of docs/config.md."""
    lines = [_HEADER, *_section(RunConfig, "Top level (no section)")]
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        section = hints[f.name]
        if dataclasses.is_dataclass(section):
            lines += _section(typing.cast(type, section), f"[{f.name}]")
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render(), end="")
