"""Evaluation: held-out loss per category, k-shot MMLU by answer-letter log-likelihood, MT-Bench
answer samples (``flora eval``), and the comparison report across runs (``flora compare``)."""

from flora.evaluation.evaluate import (
    TASKS,
    EvalOptions,
    Target,
    evaluate,
    format_results,
    parse_tasks,
    resolve_target,
)
from flora.evaluation.heldout import heldout_data, heldout_report
from flora.evaluation.mmlu import MMLUResult, score_mmlu, score_prompts
from flora.evaluation.mmlu_data import Question, format_prompt, load_mmlu
from flora.evaluation.mmlu_results import Score, group_scores, summarize
from flora.evaluation.report import write_report
from flora.evaluation.runs import RunSummary, summarize_run
from flora.evaluation.samples import load_mt_bench

__all__ = [
    "TASKS",
    "EvalOptions",
    "MMLUResult",
    "Question",
    "RunSummary",
    "Score",
    "Target",
    "evaluate",
    "format_prompt",
    "format_results",
    "group_scores",
    "heldout_data",
    "heldout_report",
    "load_mmlu",
    "load_mt_bench",
    "parse_tasks",
    "resolve_target",
    "score_mmlu",
    "score_prompts",
    "summarize",
    "summarize_run",
    "write_report",
]
