"""Held-out loss and perplexity, overall and per category, on a run's own held-out split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.config import RunConfig
from flora.data.federated import FederatedData, run_data
from flora.data.prompts import IGNORE_INDEX, Example
from flora.training import category_losses

__all__ = ["heldout_data", "heldout_report", "supervised_tokens"]


def heldout_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> FederatedData:
    """The data a run with ``config`` sees: same arguments and seed, hence the same split."""
    return run_data(config, tokenizer)


def supervised_tokens(example: Example) -> int:
    """Tokens the shifted causal-LM loss counts for one example (as evaluate_loss counts them)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def _entry(loss: float, examples: int, tokens: int) -> dict[str, Any]:
    return {"loss": loss, "perplexity": math.exp(loss), "examples": examples, "tokens": tokens}


def heldout_report(
    model: PreTrainedModel,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Token-weighted loss and perplexity over all ``examples`` and per ``category``.

    Each category is evaluated on its own; the overall loss is their token-weighted mean, which
    equals evaluate_loss over all examples (the same token-weighted mean, batched differently).
    """
    overall, losses = category_losses(
        model, examples, batch_size=batch_size, pad_id=pad_id, precision=precision
    )
    per_category = {k: _entry(loss, n, tokens) for k, (loss, n, tokens) in losses.items()}
    count = sum(tokens for _, _, tokens in losses.values())
    return _entry(overall, len(examples), count) | {"per_category": per_category}
