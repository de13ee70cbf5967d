"""Batches of tokenised examples: deterministic shuffling and right-padded tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from flora.data._seed import make_rng
from flora.data.prompts import IGNORE_INDEX, Example
from flora.errors import FloraError

__all__ = ["batches", "collate"]

T = TypeVar("T")


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids`` with ``pad_id``, ``labels`` with -100.

    Returns ``input_ids``, ``labels`` and ``attention_mask`` (1 on real tokens), each (B, T) int64.
    """
    if not examples:
        raise FloraError("collate needs at least one example; check data.batch_size and the data")
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        if len(example["labels"]) != length:
            raise FloraError(
                f"collate: example {row} has {length} input_ids but {len(example['labels'])} "
                f"labels; encode it with flora.data.encode_example"
            )
        input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


GROUP_SPAN = 50  # batches per length group (as transformers' LengthGroupedSampler)


def batches(
    examples: Sequence[T],
    batch_size: int,
    seed: int,
    epoch: int,
    lengths: Sequence[int] | None = None,
) -> Iterator[list[T]]:
    """Every example once, in batches, in an order fixed by (seed, epoch); the last may be short.

    With ``lengths`` (one per example), batches hold examples of similar length, so less of
    each batch is padding: the shuffled order is cut into groups of ``GROUP_SPAN`` batches,
    each group sorted by length, cut into batches, and those batches shuffled within the group.
    Arguments are checked on the call, not on the first ``next``.
    """
    if batch_size < 1:
        raise FloraError(f"train.batch_size must be >= 1, got {batch_size}")
    rng = make_rng(seed, epoch)
    order = rng.permutation(len(examples)).tolist()
    if lengths is not None:
        if len(lengths) != len(examples):
            raise FloraError(f"batches: {len(lengths)} lengths for {len(examples)} examples")
        span = batch_size * GROUP_SPAN
        grouped: list[int] = []
        for start in range(0, len(order), span):
            group = sorted(order[start : start + span], key=lambda i: -lengths[i])
            chunks = list(_chunks(group, batch_size))
            for k in rng.permutation(len(chunks)).tolist():
                grouped.extend(chunks[k])
        order = grouped
    return _chunks([examples[i] for i in order], batch_size)


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
