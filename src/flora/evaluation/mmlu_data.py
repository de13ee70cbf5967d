"""MMLU questions and their k-shot prompts, formatted as lm-evaluation-harness formats them.

MMLU: Hendrycks et al., ICLR 2021 (https://arxiv.org/abs/2009.03300). Questions come from the
shared data folder (``mmlu/{dev,test}/<subject>_{dev,test}.csv``, header
``question,choice0,choice1,choice2,choice3,answer``), else from the hub id ``cais/mmlu``.

The prompt follows the harness's ``mmlu`` task (default template): a description line, ``k``
solved dev questions, then the test question ending in ``Answer:``; the model is scored on the
continuations " A" ... " D".
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flora.data.sources import find_shared_data, load_hub_split
from flora.errors import FloraError

__all__ = [
    "LETTERS",
    "MMLU_DIR",
    "MMLU_HUB_ID",
    "Question",
    "format_prompt",
    "format_question",
    "load_mmlu",
    "read_subject_csv",
]

LETTERS = ("A", "B", "C", "D")
MMLU_DIR = "mmlu"
MMLU_HUB_ID = "cais/mmlu"
_COLUMNS = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


@dataclass(frozen=True)
class Question:
    subject: str  # e.g. "abstract_algebra"
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index of the right choice, 0-3


def format_question(question: Question, answer: bool) -> str:
    """One question block; with ``answer`` it ends in " X\\n\\n" (a solved shot)."""
    lines = [question.question.strip()]
    lines += [
        f"{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices, strict=True)
    ]
    text = "\n".join(lines) + "\nAnswer:"
    return f"{text} {LETTERS[question.answer]}\n\n" if answer else text


def format_prompt(question: Question, shots: Sequence[Question]) -> str:
    """The harness's prompt: description, solved ``shots``, then ``question`` ending 'Answer:'."""
    subject = " ".join(question.subject.split("_"))
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return (
        header
        + "".join(format_question(s, answer=True) for s in shots)
        + format_question(question, answer=False)
    )


def read_subject_csv(path: Path, subject: str) -> list[Question]:
    """Questions of one subject from a CSV with the shared data folder's header."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != _COLUMNS:
            raise FloraError(f"{path}: header {reader.fieldnames}, expected {','.join(_COLUMNS)}")
        out = []
        for number, row in enumerate(reader, start=2):
            if row["answer"] not in ("0", "1", "2", "3"):
                raise FloraError(f"{path}: line {number} has answer {row['answer']!r}; need 0-3")
            choices = (row["choice0"], row["choice1"], row["choice2"], row["choice3"])
            out.append(Question(subject, row["question"], choices, int(row["answer"])))
    return out


def load_mmlu(split: str) -> dict[str, list[Question]]:
    """``split`` ("dev" or "test") by subject, sorted by subject name, in the source's order."""
    if split not in ("dev", "test"):
        raise FloraError(f"MMLU split must be 'dev' or 'test', got {split!r}")
    marker = find_shared_data(f"{MMLU_DIR}/{split}/abstract_algebra_{split}.csv")
    if marker is None:
        return _load_hub(split)
    suffix = f"_{split}.csv"
    files = sorted(marker.parent.glob(f"*{suffix}"))
    return {f.name[: -len(suffix)]: read_subject_csv(f, f.name[: -len(suffix)]) for f in files}


def _load_hub(split: str) -> dict[str, list[Question]]:
    rows = load_hub_split(
        MMLU_HUB_ID,
        split,
        config="all",
        what=f"MMLU (no shared copy in shared/data/{MMLU_DIR}/)",
        fix=f"set FLORA_DATA_DIR to a folder holding {MMLU_DIR}/",
    )
    out: dict[str, list[Question]] = {}
    for row in rows:
        listed = [str(c) for c in row["choices"]]
        if len(listed) != 4:
            subject = row["subject"]
            raise FloraError(f"{MMLU_HUB_ID}: a {subject} question has {len(listed)} choices")
        choices = (listed[0], listed[1], listed[2], listed[3])
        question = Question(row["subject"], row["question"], choices, int(row["answer"]))
        out.setdefault(row["subject"], []).append(question)
    return dict(sorted(out.items()))
