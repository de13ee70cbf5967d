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
from flora.evaluation.mmlu_results import CATEGORIES

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
    """``{"kind": "mmlu", "round": ..., "acc": ..., "acc_stderr": ..., "acc_macro": ...}``.

    ``acc`` is the lm-evaluation-harness ``mmlu`` figure (weighted by subject size) and
    ``acc_stderr`` its standard error (None where the harness writes "N/A": one question a
    subject); ``acc_macro`` the mean over subjects; ``groups`` the same for each category.
    """
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
    scores = result.scores()
    overall = scores["mmlu"]
    return {
        "kind": "mmlu",
        "round": round,
        "acc": overall.acc,
        "acc_stderr": overall.acc_stderr,
        "acc_macro": overall.acc_macro,
        "groups": {
            group: {"acc": scores[group].acc, "acc_stderr": scores[group].acc_stderr}
            for group in CATEGORIES
            if group in scores
        },
        "questions": result.questions,
        "shots": config.mmlu_shots,
        "limit_per_subject": config.mmlu_limit_per_subject,
        "seconds": result.seconds,
        "per_subject": {s: c / t for s, (c, t) in result.per_subject.items() if t > 0},
    }
