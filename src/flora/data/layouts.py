"""One raw row of any common instruction layout to flora's record.

A record is a plain ``dict[str, str]``: ``instruction``, ``context``, ``response``, ``category``
(the partition label: the value of ``data.label_column``, ``"all"`` where the row has none) and,
with ``data.natural_id_column``, ``natural_id``. Layouts recognised from the columns:

- flora / Dolly: ``instruction``, ``context`` (optional), ``response``
- Alpaca: ``instruction``, ``input`` (optional), ``output``
- chat: ``messages``, a list of ``{"role", "content"}``: the first user turn is the
  instruction, the assistant turn after it the response (later turns are left out)

``data.fields`` maps flora's names to a dataset's own, e.g. ``{instruction = "question",
response = "answer"}`` or ``{messages = "conversation"}``, and wins over detection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flora.errors import FloraError

__all__ = ["FIELD_NAMES", "Layout", "Record", "detect_layout", "to_record"]

Record = dict[str, str]
FIELD_NAMES = ("instruction", "context", "response", "messages")
_LAYOUTS: dict[str, dict[str, str]] = {
    "flora": {"instruction": "instruction", "context": "context", "response": "response"},
    "alpaca": {"instruction": "instruction", "context": "input", "response": "output"},
}


@dataclass(frozen=True)
class Layout:
    name: str  # "flora", "alpaca", "chat" or "mapped"
    instruction: str = ""  # the column of each field ("" where it has none)
    context: str = ""
    response: str = ""
    messages: str = ""


def detect_layout(columns: Sequence[str], fields: Mapping[str, str], where: str) -> Layout:
    """The layout of rows with these ``columns``: ``fields`` (data.fields) first, then
    flora/Dolly, Alpaca, chat. A FloraError naming the columns when none fits."""
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise FloraError(f"data.fields: unknown field(s) {unknown}; use {list(FIELD_NAMES)}")
    present = set(columns)
    if fields:
        absent = sorted(f"{k} = {v!r}" for k, v in fields.items() if v not in present)
        if absent:
            lacking = ", ".join(absent)
            raise FloraError(
                f"{where}: data.fields names column(s) it lacks ({lacking}); "
                f"its columns: {sorted(present)}"
            )
        if "messages" in fields:
            return Layout("mapped", messages=fields["messages"])
        layout = Layout(
            "mapped",
            fields.get("instruction", ""),
            fields.get("context", ""),
            fields.get("response", ""),
        )
        if layout.instruction and layout.response:
            return layout
        raise FloraError(
            "data.fields must name the instruction and response columns (or a messages column)"
        )
    for name, names in _LAYOUTS.items():
        if names["instruction"] in present and names["response"] in present:
            context = names["context"] if names["context"] in present else ""
            return Layout(name, names["instruction"], context, names["response"])
    if "messages" in present:
        return Layout("chat", messages="messages")
    raise FloraError(
        f"{where}: no known layout in columns {sorted(present)}: give instruction/response "
        "(with context), Alpaca's instruction/input/output, or chat messages; or map yours "
        "with data.fields, e.g. data.fields = {instruction = 'question', response = 'answer'}"
    )


def to_record(
    row: Mapping[str, Any],
    layout: Layout,
    where: str,
    label: str = "category",
    natural_id: str = "",
) -> Record:
    """One row as a record; ``label`` and ``natural_id`` name the columns of the partition
    label and of the natural id (required where given)."""
    if not isinstance(row, Mapping):
        raise FloraError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if layout.messages:
        instruction, response = _chat_pair(row.get(layout.messages), where)
        context = ""
    else:
        instruction = _text(row, layout.instruction, where, required=True)
        response = _text(row, layout.response, where, required=True)
        context = _text(row, layout.context, where) if layout.context else ""
    record: Record = {
        "instruction": instruction,
        "context": context,
        "response": response,
        "category": _label(row.get(label)),
    }
    if natural_id:
        value = row.get(natural_id)
        if value is None or value == "":
            raise FloraError(f"{where}: no value in data.natural_id_column {natural_id!r}")
        record["natural_id"] = str(value)
    return record


def _label(value: Any) -> str:
    return "all" if value is None or value == "" else str(value)


def _text(row: Mapping[str, Any], column: str, where: str, *, required: bool = False) -> str:
    value = row.get(column)
    if value is None:
        if required:
            raise FloraError(
                f"{where}: missing field {column!r} (found {sorted(row)}); every "
                "record needs an instruction and a response"
            )
        return ""
    if not isinstance(value, str):
        raise FloraError(f"{where}: field {column!r} must be a string, got {type(value).__name__}")
    return value


def _chat_pair(messages: Any, where: str) -> tuple[str, str]:
    """The first user turn and the assistant turn that answers it."""
    if not isinstance(messages, list | tuple):
        raise FloraError(f"{where}: messages must be a list of {{role, content}} turns")
    for i, turn in enumerate(messages):
        if isinstance(turn, Mapping) and turn.get("role") == "user":
            answer = next(
                (
                    t
                    for t in messages[i + 1 :]
                    if isinstance(t, Mapping) and t.get("role") == "assistant"
                ),
                None,
            )
            if answer is None:
                break
            return _text(turn, "content", where, required=True), _text(
                answer, "content", where, required=True
            )
    raise FloraError(f"{where}: messages hold no user turn followed by an assistant turn")
