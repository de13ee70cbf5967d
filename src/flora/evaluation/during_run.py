"""MMLU inside a run (``eval.mmlu``): the global model's k-shot score as a metrics row.

Both runtimes call :func:`mmlu_row` with the global LoRA applied to their base model, before
round 1, every ``eval.mmlu_every`` rounds and after the last one (``EvalConfig.mmlu_at``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.config import EvalConfig
from flora.evaluation.mmlu import score_mmlu
from flora.evaluation.mmlu_data import Question, load_mmlu

__all__ = ["mmlu_row"]


@cache
def _mmlu(split: str) -> dict[str, list[Question]]:
    return load_mmlu(split)  # read once per process: a run scores it several times


def mmlu_row(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: EvalConfig,
    round: int,
    precision: str,
) -> dict[str, Any]:
    """``{"kind": "mmlu", "round": ..., macro/micro accuracy, questions, seconds, ...}``."""
    result = score_mmlu(
        model,
        tokenizer,
        _mmlu("test"),
        _mmlu("dev"),
        shots=config.mmlu_shots,
        limit_per_subject=config.mmlu_limit_per_subject,
        batch_size=config.batch_size,
        precision=precision,
    )
    scores = result.to_dict()
    return {
        "kind": "mmlu",
        "round": round,
        "macro_accuracy": scores["macro_accuracy"],
        "micro_accuracy": scores["micro_accuracy"],
        "questions": scores["questions"],
        "shots": config.mmlu_shots,
        "limit_per_subject": config.mmlu_limit_per_subject,
        "seconds": result.seconds,
        "per_subject": {s: v["accuracy"] for s, v in scores["per_subject"].items()},
    }
