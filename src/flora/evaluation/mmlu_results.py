"""MMLU figures as lm-evaluation-harness reports them, and its results shape.

Per subject (task ``mmlu_<subject>``): ``acc``, the mean of the 0/1 scores, and ``acc_stderr``,
the harness's ``mean_stderr``: sample standard deviation over sqrt(n), which for 0/1 scores is
sqrt(p (1 - p) / (n - 1)); a subject scored on one question gets "N/A".

Per group (``mmlu`` and its four categories ``mmlu_stem``, ``mmlu_other``,
``mmlu_social_sciences``, ``mmlu_humanities``): ``acc`` is the mean over the group's subjects
weighted by their sizes (``weight_by_size: True``), which is correct answers over questions;
``acc_stderr`` is ``pooled_sample_stderr`` over the subjects,
sqrt(sum_i (n_i - 1) se_i^2 n_i / (N - k) / N) for k subjects of n_i questions, N = sum_i n_i.
Both aggregate the group's leaf tasks (the 57 subjects for ``mmlu``), not its child groups.
``acc_macro`` (the mean over subjects, unweighted) is flora's secondary figure; the harness has
no such key. With the same number of questions in every subject (a per-subject limit of at most
100: the smallest subjects have 100 test questions) the two are equal.

Source: EleutherAI/lm-evaluation-harness v0.4.12 (commit 6d642546f468): the subject-to-category
mapping is each ``lm_eval/tasks/mmlu/default/mmlu_<subject>.yaml``'s ``tag``, the groups are
``_mmlu.yaml`` and ``_mmlu_<category>.yaml`` (aliases, version 2; subjects version 1.0 from
``_default_template_yaml``); the formulas are ``mean_stderr``, ``aggregate_subtask_metrics`` and
``pooled_sample_stderr`` in ``lm_eval/api/metrics.py``, applied by ``Group.aggregate`` in
``lm_eval/api/group.py``; the results shape is ``EvalAcc._to_eval_results`` in
``lm_eval/evaluator_utils.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flora.errors import FloraError

__all__ = [
    "CATEGORIES",
    "NA",
    "SUBJECT_CATEGORIES",
    "Score",
    "group_scores",
    "harness_results",
    "pooled_stderr",
    "subject_stderr",
    "summarize",
    "task_name",
]

NA = "N/A"  # the harness's stderr where it cannot compute one
CATEGORIES = {  # group -> alias, in _mmlu.yaml's order
    "mmlu_stem": "stem",
    "mmlu_other": "other",
    "mmlu_social_sciences": "social sciences",
    "mmlu_humanities": "humanities",
}
_STEM, _OTHER, _SOCIAL, _HUMAN = CATEGORIES
SUBJECT_CATEGORIES = {  # subject -> group: the "tag" of lm_eval/tasks/mmlu/default/mmlu_<s>.yaml
    "abstract_algebra": _STEM,
    "anatomy": _STEM,
    "astronomy": _STEM,
    "business_ethics": _OTHER,
    "clinical_knowledge": _OTHER,
    "college_biology": _STEM,
    "college_chemistry": _STEM,
    "college_computer_science": _STEM,
    "college_mathematics": _STEM,
    "college_medicine": _OTHER,
    "college_physics": _STEM,
    "computer_security": _STEM,
    "conceptual_physics": _STEM,
    "econometrics": _SOCIAL,
    "electrical_engineering": _STEM,
    "elementary_mathematics": _STEM,
    "formal_logic": _HUMAN,
    "global_facts": _OTHER,
    "high_school_biology": _STEM,
    "high_school_chemistry": _STEM,
    "high_school_computer_science": _STEM,
    "high_school_european_history": _HUMAN,
    "high_school_geography": _SOCIAL,
    "high_school_government_and_politics": _SOCIAL,
    "high_school_macroeconomics": _SOCIAL,
    "high_school_mathematics": _STEM,
    "high_school_microeconomics": _SOCIAL,
    "high_school_physics": _STEM,
    "high_school_psychology": _SOCIAL,
    "high_school_statistics": _STEM,
    "high_school_us_history": _HUMAN,
    "high_school_world_history": _HUMAN,
    "human_aging": _OTHER,
    "human_sexuality": _SOCIAL,
    "international_law": _HUMAN,
    "jurisprudence": _HUMAN,
    "logical_fallacies": _HUMAN,
    "machine_learning": _STEM,
    "management": _OTHER,
    "marketing": _OTHER,
    "medical_genetics": _OTHER,
    "miscellaneous": _OTHER,
    "moral_disputes": _HUMAN,
    "moral_scenarios": _HUMAN,
    "nutrition": _OTHER,
    "philosophy": _HUMAN,
    "prehistory": _HUMAN,
    "professional_accounting": _OTHER,
    "professional_law": _HUMAN,
    "professional_medicine": _OTHER,
    "professional_psychology": _SOCIAL,
    "public_relations": _SOCIAL,
    "security_studies": _SOCIAL,
    "sociology": _SOCIAL,
    "us_foreign_policy": _SOCIAL,
    "virology": _OTHER,
    "world_religions": _HUMAN,
}
_SUBJECT_VERSION, _GROUP_VERSION = 1.0, 2


@dataclass(frozen=True)
class Score:
    """One task's or group's figures."""

    acc: float  # correct / questions: for a group, the size-weighted mean over its subjects
    acc_stderr: float | None  # None where the harness writes "N/A"
    acc_macro: float  # mean over subjects, unweighted (a subject: its acc)
    subjects: int
    questions: int


def task_name(subject: str) -> str:
    return f"mmlu_{subject}"


def subject_stderr(correct: int, total: int) -> float | None:
    """The harness's mean_stderr of ``total`` 0/1 scores, ``correct`` of them 1.

    sample_stddev / sqrt(n) with sample_stddev^2 = n p (1 - p) / (n - 1): sqrt(p (1 - p) / (n - 1)).
    None for fewer than two scores (the harness writes "N/A").
    """
    if total < 2:
        return None
    p = correct / total
    return math.sqrt(p * (1.0 - p) / (total - 1))


def pooled_stderr(stderrs: Sequence[float | None], sizes: Sequence[int]) -> float | None:
    """The harness's pooled_sample_stderr; None when a subject has none (its "N/A")."""
    if len(stderrs) != len(sizes):
        raise FloraError(f"pooled stderr: {len(stderrs)} stderrs for {len(sizes)} sizes")
    known = [s for s in stderrs if s is not None]
    if not known or len(known) != len(stderrs):
        return None
    total = sum(sizes)
    variance = sum((n - 1) * s**2 * n for s, n in zip(known, sizes, strict=True))
    return math.sqrt(variance / (total - len(sizes)) / total)


def _aggregate(per_subject: Mapping[str, tuple[int, int]]) -> Score:
    counts = list(per_subject.values())
    correct, total = sum(c for c, _ in counts), sum(t for _, t in counts)
    stderrs = [subject_stderr(c, t) for c, t in counts]
    return Score(
        acc=correct / total,
        acc_stderr=pooled_stderr(stderrs, [t for _, t in counts]),
        acc_macro=sum(c / t for c, t in counts) / len(counts),
        subjects=len(counts),
        questions=total,
    )


def group_scores(per_subject: Mapping[str, tuple[int, int]]) -> dict[str, Score]:
    """``mmlu``, then each category with a scored subject (subjects outside the 57 count only
    in ``mmlu``), then every scored subject by its task name. Subjects with no question are left
    out; FloraError when none is left."""
    scored = {s: (c, t) for s, (c, t) in per_subject.items() if t > 0}
    if not scored:
        raise FloraError("MMLU: no question was scored; check --limit-per-subject and the data")
    out = {"mmlu": _aggregate(scored)}
    for group in CATEGORIES:
        members = {s: v for s, v in scored.items() if SUBJECT_CATEGORIES.get(s) == group}
        if members:
            out[group] = _aggregate(members)
    for subject, (correct, total) in scored.items():
        stderr = subject_stderr(correct, total)
        out[task_name(subject)] = Score(correct / total, stderr, correct / total, 1, total)
    return out


def summarize(per_subject: Mapping[str, tuple[int, int]]) -> Score:
    """The ``mmlu`` group's figures: weighted acc, its stderr, and the macro average."""
    return group_scores(per_subject)["mmlu"]


def _entry(name: str, alias: str, score: Score, group: bool) -> dict[str, Any]:
    stderr = NA if score.acc_stderr is None else score.acc_stderr
    entry = {
        "name": name,
        "alias": alias,
        "sample_len": score.questions,
        "acc,none": score.acc,
        "acc_stderr,none": stderr,
    }
    return entry | {"acc_macro,none": score.acc_macro} if group else entry


def _config(subject: str, shots: int) -> dict[str, Any]:
    """The subject task's config, short: what identifies its data, prompt and metric."""
    return {
        "task": task_name(subject),
        "task_alias": subject,
        "tag": SUBJECT_CATEGORIES.get(subject, "mmlu") + "_tasks",
        "dataset_path": "cais/mmlu",
        "dataset_name": subject,
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": shots,
        "output_type": "multiple_choice",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def harness_results(
    per_subject: Mapping[str, tuple[int, int]], available: Mapping[str, int], shots: int
) -> dict[str, dict[str, Any]]:
    """``results``, ``groups``, ``group_subtasks``, ``configs``, ``versions``, ``n-shot``,
    ``higher_is_better`` and ``n-samples`` of an MMLU evaluation, keyed as the harness keys them.

    ``available``: each subject's test questions before the limit (n-samples' "original").
    """
    scores = group_scores(per_subject)
    subjects = [s for s, (_, t) in per_subject.items() if t > 0]
    groups = {"mmlu": "mmlu"} | {g: a for g, a in CATEGORIES.items() if g in scores}
    subtasks = {"mmlu": [g for g in groups if g != "mmlu"]}
    for group in subtasks["mmlu"]:
        subtasks[group] = [task_name(s) for s in subjects if SUBJECT_CATEGORIES[s] == group]
    subtasks["mmlu"] += [task_name(s) for s in subjects if s not in SUBJECT_CATEGORIES]
    results = {g: _entry(g, alias, scores[g], group=True) for g, alias in groups.items()}
    tasks = {task_name(s): s for s in subjects}
    results |= {t: _entry(t, s, scores[t], group=False) for t, s in tasks.items()}
    names = [*groups, *tasks]
    counts = {
        t: {"original": available.get(s, per_subject[s][1]), "effective": per_subject[s][1]}
        for t, s in tasks.items()
    }
    return {
        "results": results,
        "groups": {g: results[g] for g in groups},
        "group_subtasks": subtasks,
        "configs": {t: _config(s, shots) for t, s in tasks.items()},
        "versions": {n: _GROUP_VERSION if n in groups else _SUBJECT_VERSION for n in names},
        "n-shot": dict.fromkeys(names, shots),
        "higher_is_better": {n: {"acc": True} for n in names},
        "n-samples": counts,
    }
