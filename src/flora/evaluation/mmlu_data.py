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

from flora.data.sources import load_hub_split, shared_data_roots
from flora.errors import FloraError
from flora.evaluation.mmlu_results import SUBJECT_CATEGORIES

__all__ = [
    "LETTERS",
    "MMLU_DIR",
    "MMLU_HUB_ID",
    "Question",
    "check_subjects",
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


def check_subjects(subjects: Sequence[str] | None) -> list[str]:
    """The subjects asked for (None: all 57), each checked to be one of MMLU's."""
    wanted = list(dict.fromkeys(subjects)) if subjects else sorted(SUBJECT_CATEGORIES)
    unknown = [s for s in wanted if s not in SUBJECT_CATEGORIES]
    if unknown:
        raise FloraError(
            f"--subjects: {unknown[0]!r} is not an MMLU subject; use names such as "
            "abstract_algebra, anatomy, college_physics (the 57 of cais/mmlu)"
        )
    return wanted


def load_mmlu(split: str, subjects: Sequence[str] | None = None) -> dict[str, list[Question]]:
    """``split`` ("dev" or "test") of ``subjects`` (None: all 57), sorted by subject name, in the
    source's order. From the shared data folder where it holds MMLU: a subject missing there is
    an error naming it, never a quiet download; from the hub only where no folder holds any."""
    if split not in ("dev", "test"):
        raise FloraError(f"MMLU split must be 'dev' or 'test', got {split!r}")
    wanted = check_subjects(subjects)
    folder = _local_folder(split)
    if folder is None:
        hub = _load_hub(split)
        return {s: hub[s] for s in sorted(wanted) if s in hub}
    suffix = f"_{split}.csv"
    missing = [s for s in wanted if not (folder / f"{s}{suffix}").is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise FloraError(
            f"{folder}: no {split} CSV for MMLU subject(s) {shown}; add them (cais/mmlu) or "
            "choose --subjects among those present"
        )
    return {s: read_subject_csv(folder / f"{s}{suffix}", s) for s in sorted(wanted)}


def _local_folder(split: str) -> Path | None:
    """The shared data folder's ``mmlu/<split>``, found by any subject's file in it."""
    for root in shared_data_roots():  # the first root holding any subject's file
        folder = root / MMLU_DIR / split
        if any((folder / f"{s}_{split}.csv").is_file() for s in SUBJECT_CATEGORIES):
            return folder
    return None


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
