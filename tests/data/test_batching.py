"""Padding and deterministic per-epoch shuffling."""

from __future__ import annotations

import pytest
import torch

from flora.data import Example, batches, collate
from flora.errors import FloraError


def example(ids: list[int], prompt_len: int) -> Example:
    return Example(input_ids=ids, labels=[-100] * prompt_len + ids[prompt_len:], category="c")


def test_collate_right_pads() -> None:
    # Prepare
    examples = [example([5, 6, 7], 1), example([8], 0)]

    # Execute
    batch = collate(examples, pad_id=0)

    # Assert
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


@pytest.mark.parametrize(
    ("examples", "message"),
    [([], "at least one example"), ([Example(input_ids=[1, 2], labels=[1], category="c")], "2")],
)
def test_collate_rejects_bad_input(examples: list[Example], message: str) -> None:
    with pytest.raises(FloraError, match=message):
        collate(examples, pad_id=0)


@pytest.mark.parametrize(
    ("n", "batch_size", "sizes"), [(10, 4, [4, 4, 2]), (3, 5, [3]), (0, 2, [])]
)
def test_batches_cover_everything_once(n: int, batch_size: int, sizes: list[int]) -> None:
    items = list(range(n))

    out = list(batches(items, batch_size, seed=0, epoch=0))

    assert [len(batch) for batch in out] == sizes
    assert sorted(i for batch in out for i in batch) == items


def test_batches_order_depends_on_seed_and_epoch_only() -> None:
    items = list(range(50))

    def order(seed: int, epoch: int) -> list[int]:
        return [i for batch in batches(items, 8, seed, epoch) for i in batch]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)


def test_batches_checks_batch_size_on_call() -> None:
    with pytest.raises(FloraError, match="batch_size"):
        batches([1, 2], 0, seed=0, epoch=0)


def _padding(out: list[list[int]], lengths: list[int]) -> float:
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in out)
    return 1 - sum(lengths) / padded


@pytest.mark.parametrize("n", [0, 7, 1000, 1234])
def test_length_grouped_batches_cover_everything_once_with_less_padding(n: int) -> None:
    # Prepare: lengths as spread out as Dolly's (a few long examples among many short)
    rng = torch.Generator().manual_seed(n)
    lengths = (torch.rand(n, generator=rng) ** 3 * 500 + 10).long().tolist()
    items = list(range(n))
    # Execute
    plain = list(batches(items, 8, seed=3, epoch=0))
    grouped = list(batches(items, 8, seed=3, epoch=0, lengths=lengths))
    # Assert: the same examples, one batch shorter than 8 at most, far less padding
    assert sorted(i for batch in grouped for i in batch) == items
    assert sum(len(batch) < 8 for batch in grouped) == (n % 8 > 0)
    if n >= 1000:
        assert _padding(grouped, lengths) < 0.2 * _padding(plain, lengths)
        assert grouped[:3] != sorted(grouped, key=lambda b: -lengths[b[0]])[:3]  # not one sort


def test_length_grouped_order_depends_on_seed_and_epoch_only() -> None:
    items, lengths = list(range(900)), [(i * 37) % 101 for i in range(900)]

    def order(seed: int, epoch: int) -> list[int]:
        return [i for b in batches(items, 8, seed, epoch, lengths=lengths) for i in b]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    with pytest.raises(FloraError, match="lengths"):
        batches(items, 8, 1, 0, lengths=lengths[:-1])
