"""Greedy answers to MT-Bench's first-turn questions, for reading the tuned and base side by side.

MT-Bench: Zheng et al., NeurIPS 2023 (https://arxiv.org/abs/2306.05685). No judge model is
reachable here, so the questions serve for samples, not scores. They come from the shared data
folder (``mt-bench/question.jsonl``), else from the hub id ``lmsys/mt_bench_human_judgments``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.data.prompts import Template
from flora.data.sources import find_shared_data, load_hub_split
from flora.errors import FloraError
from flora.generation import generate_answer

__all__ = ["MT_BENCH_FILE", "MT_BENCH_HUB_ID", "answer_all", "load_mt_bench"]

MT_BENCH_FILE = "mt-bench/question.jsonl"
MT_BENCH_HUB_ID = "lmsys/mt_bench_human_judgments"


def load_mt_bench(limit: int = 0) -> list[dict[str, Any]]:
    """The first ``limit`` questions (0: all 80): question_id, category, prompt (turn 1)."""
    path = find_shared_data(MT_BENCH_FILE)
    rows = _from_hub() if path is None else _from_file(path.read_text(encoding="utf-8"))
    rows.sort(key=lambda row: int(row["question_id"]))
    return rows[:limit] if limit else rows


def _from_file(text: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(
                {
                    "question_id": int(row["question_id"]),
                    "category": str(row.get("category", "")),
                    "prompt": str(row["turns"][0]),
                }
            )
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
            raise FloraError(
                f"{MT_BENCH_FILE}: line {number} is not a question (question_id, turns)"
            ) from None
    return rows


def _from_hub() -> list[dict[str, Any]]:
    what = f"MT-Bench (no shared copy of {MT_BENCH_FILE})"
    fix = f"set FLORA_DATA_DIR to a folder holding {MT_BENCH_FILE}"
    judgments = load_hub_split(MT_BENCH_HUB_ID, "human", what=what, fix=fix)
    questions: dict[int, dict[str, Any]] = {}
    for row in judgments:  # many judgments per question; turn 1 is the conversation's first
        qid = int(row["question_id"])
        if qid not in questions:
            prompt = str(row["conversation_a"][0]["content"])
            questions[qid] = {"question_id": qid, "category": "", "prompt": prompt}
    return list(questions.values())


def answer_all(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    template: Template,
    max_new_tokens: int,
    precision: str,
) -> list[str]:
    """The model's greedy answer to each prompt, formatted with ``template``."""
    return [
        generate_answer(
            model,
            tokenizer,
            prompt,
            template=template,
            max_new_tokens=max_new_tokens,
            precision=precision,
        )
        for prompt in prompts
    ]
