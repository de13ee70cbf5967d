"""Batches of tokenised examples: deterministic shuffling and right-padded tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from flora.data._seed import make_rng
from flora.data.prompts import IGNORE_INDEX, Example
from flora.errors import FloraError

__all__ = ["batches", "collate", "pack"]

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


def pack(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """The examples packed end to end in one row, no padding (``train.packing``).

    Returns ``input_ids``, ``labels`` and ``position_ids``, each (1, sum of lengths) int64: the
    position ids restart at 0 with each example, which is how transformers recognises a packed
    row and keeps each token's attention within its own example (its packed-sequence masks for
    SDPA, flash-attention's variable-length kernels). Each example's first label is -100, so no
    token is predicted across a boundary; the response tokens and their loss are those of the
    unpacked examples.
    """
    if not examples:
        raise FloraError("pack needs at least one example; check data.batch_size and the data")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        if len(example["labels"]) != length or length == 0:
            raise FloraError(
                f"pack: example {row} has {length} input_ids and {len(example['labels'])} "
                "labels; encode it with flora.data.encode_example"
            )
        ids.extend(example["input_ids"])
        labels.extend([IGNORE_INDEX, *example["labels"][1:]])
        positions.extend(range(length))
    packed = {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {k: torch.tensor([v], dtype=torch.long) for k, v in packed.items()}


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
