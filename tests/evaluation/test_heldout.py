"""Held-out loss per category: the categories' token-weighted mean is the overall loss."""

from __future__ import annotations

import math

import pytest

from flora.evaluation.heldout import heldout_report, supervised_tokens
from flora.training import evaluate_loss


def test_overall_loss_is_the_token_weighted_mean_of_the_categories(
    tiny_model, token_examples, torch_single_thread
):
    # Prepare: two categories of two examples each
    for example, category in zip(token_examples, ["qa", "qa", "summary", "summary"], strict=True):
        example["category"] = category
    expected = evaluate_loss(tiny_model, token_examples, batch_size=3, pad_id=0)
    # Execute
    report = heldout_report(tiny_model, token_examples, batch_size=3, pad_id=0)
    # Assert
    assert report["loss"] == pytest.approx(expected, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert sorted(report["per_category"]) == ["qa", "summary"]
    qa = report["per_category"]["qa"]
    assert qa["examples"] == 2
    assert qa["tokens"] == sum(supervised_tokens(e) for e in token_examples[:2])
    assert qa["loss"] == pytest.approx(
        evaluate_loss(tiny_model, token_examples[:2], batch_size=3, pad_id=0), rel=1e-5
    )
