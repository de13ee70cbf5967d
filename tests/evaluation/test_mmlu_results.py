"""MMLU figures as lm-evaluation-harness computes them, against hand computations: per-subject
stderr, the size-weighted group accuracy and its pooled stderr, the categories, the results shape.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

import pytest

from flora.data.sources import find_shared_data
from flora.errors import FloraError
from flora.evaluation.mmlu_results import (
    NA,
    SUBJECT_CATEGORIES,
    group_scores,
    harness_results,
    pooled_stderr,
    subject_stderr,
    summarize,
)

# a small subject answered badly, a bigger one answered well: macro 0.5, weighted 10/16
COUNTS = {"abstract_algebra": (1, 4), "world_religions": (9, 12)}


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([1, 0, 0, 0], 0.25),  # sd of [1,0,0,0] = 0.5 (n - 1 in the variance), / sqrt(4)
        ([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], math.sqrt(0.2 * 0.8 / 9)),
        ([1, 1, 1], 0.0),
        ([0, 1], 0.5),
    ],
)
def test_subject_stderr_is_the_harness_mean_stderr(scores, expected):
    # Prepare: the harness's mean_stderr, sample_stddev(arr) / sqrt(len(arr)), written anew
    reference = statistics.stdev(scores) / math.sqrt(len(scores))
    # Execute
    stderr = subject_stderr(sum(scores), len(scores))
    # Assert
    assert stderr == pytest.approx(expected, abs=1e-12)
    assert stderr == pytest.approx(reference, abs=1e-12)


def test_one_question_has_no_stderr_and_neither_has_its_group():
    # Execute
    scores = group_scores({"anatomy": (1, 1), "astronomy": (3, 10)})
    # Assert: the harness writes "N/A" for a task of one document, and then for its groups
    assert subject_stderr(1, 1) is None and subject_stderr(0, 0) is None
    assert scores["mmlu_anatomy"].acc_stderr is None
    assert scores["mmlu_stem"].acc_stderr is None and scores["mmlu"].acc_stderr is None
    assert scores["mmlu_astronomy"].acc_stderr == pytest.approx(math.sqrt(0.3 * 0.7 / 9))


def test_weighted_accuracy_and_pooled_stderr_against_a_hand_computation():
    # Execute
    overall = summarize(COUNTS)
    # Assert: weighted by size = correct / questions; the macro average is the plain mean
    assert overall.acc == pytest.approx(10 / 16)
    assert overall.acc_macro == pytest.approx((0.25 + 0.75) / 2)
    assert overall.acc != pytest.approx(overall.acc_macro)
    # pooled_sample_stderr: sqrt(sum (n-1) se^2 n / (N - k) / N), (n-1) se^2 = p (1 - p)
    pooled = (4 * 0.25 * 0.75 + 12 * 0.75 * 0.25) / (16 - 2) / 16
    assert overall.acc_stderr == pytest.approx(math.sqrt(pooled))
    assert overall.acc_stderr == pytest.approx(0.1157275, abs=1e-7)
    assert (overall.subjects, overall.questions) == (2, 16)


def test_pooled_stderr_of_hand_made_stderrs():
    # Prepare: se 0.1 on 5 questions, 0.2 on 10
    expected = math.sqrt((4 * 0.01 * 5 + 9 * 0.04 * 10) / (15 - 2) / 15)
    # Execute, Assert
    assert pooled_stderr([0.1, 0.2], [5, 10]) == pytest.approx(expected)
    assert pooled_stderr([0.1, None], [5, 1]) is None
    with pytest.raises(FloraError, match="2 stderrs for 1 sizes"):
        pooled_stderr([0.1, 0.2], [5])


def test_categories_are_groups_of_their_subjects():
    # Execute
    scores = group_scores(COUNTS | {"marketing": (0, 0)})  # a subject with no question: left out
    # Assert
    assert list(scores) == [
        "mmlu",
        "mmlu_stem",
        "mmlu_humanities",
        "mmlu_abstract_algebra",
        "mmlu_world_religions",
    ]
    assert scores["mmlu_stem"].acc == 0.25 and scores["mmlu_humanities"].acc == 0.75
    assert scores["mmlu_stem"].acc_stderr == pytest.approx(0.25)  # one subject: its own
    with pytest.raises(FloraError, match="no question was scored"):
        summarize({"marketing": (0, 0)})


def test_the_57_subjects_fall_in_the_harness_categories():
    # Assert: counts from lm_eval/tasks/mmlu/default/mmlu_*.yaml (tag) of the harness v0.4.12
    counts = Counter(SUBJECT_CATEGORIES.values())
    assert len(SUBJECT_CATEGORIES) == 57
    assert counts == {
        "mmlu_stem": 19,
        "mmlu_other": 13,
        "mmlu_social_sciences": 12,
        "mmlu_humanities": 13,
    }
    marker = find_shared_data("mmlu/test/abstract_algebra_test.csv")
    if marker is not None:
        subjects = {p.name.removesuffix("_test.csv") for p in marker.parent.glob("*_test.csv")}
        assert subjects == set(SUBJECT_CATEGORIES)


def test_results_are_keyed_as_the_harness_keys_them():
    # Execute
    out = harness_results(COUNTS | {"anatomy": (1, 1)}, {"abstract_algebra": 100}, shots=5)
    # Assert
    assert set(out) == {
        "results",
        "groups",
        "group_subtasks",
        "configs",
        "versions",
        "n-shot",
        "higher_is_better",
        "n-samples",
    }
    results = out["results"]
    assert results["mmlu_world_religions"] == {
        "name": "mmlu_world_religions",
        "alias": "world_religions",
        "sample_len": 12,
        "acc,none": 0.75,
        "acc_stderr,none": pytest.approx(math.sqrt(0.75 * 0.25 / 11)),
    }
    assert results["mmlu_anatomy"]["acc_stderr,none"] == NA == "N/A"
    assert results["mmlu_stem"]["alias"] == "stem" and results["mmlu"]["alias"] == "mmlu"
    assert results["mmlu"]["acc,none"] == pytest.approx(11 / 17)
    assert results["mmlu"]["acc_macro,none"] == pytest.approx((0.25 + 0.75 + 1.0) / 3)
    assert set(out["groups"]) == {"mmlu", "mmlu_stem", "mmlu_humanities"}
    assert out["groups"]["mmlu"] == results["mmlu"]
    assert out["group_subtasks"] == {
        "mmlu": ["mmlu_stem", "mmlu_humanities"],
        "mmlu_stem": ["mmlu_abstract_algebra", "mmlu_anatomy"],
        "mmlu_humanities": ["mmlu_world_religions"],
    }
    assert out["n-samples"]["mmlu_abstract_algebra"] == {"original": 100, "effective": 4}
    assert out["n-shot"]["mmlu"] == out["n-shot"]["mmlu_anatomy"] == 5
    assert out["versions"]["mmlu"] == 2 and out["versions"]["mmlu_anatomy"] == 1.0
    assert out["higher_is_better"]["mmlu_stem"] == {"acc": True}
    config = out["configs"]["mmlu_anatomy"]
    assert (config["dataset_name"], config["num_fewshot"], config["tag"]) == (
        "anatomy",
        5,
        "mmlu_stem_tasks",
    )
