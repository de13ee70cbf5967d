"""Shared fixtures: the cached SmolLM2 tokenizer, a tiny random Llama, hand-made token examples."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture
def torch_single_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core box two OpenMP threads slow tiny models ~50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The cached SmolLM2 checkpoint (converted from the packaged GGUF on the first run, ~25 s)."""
    from flora.models import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path):
    from flora.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh 2-layer, 64-wide random Llama (seed 0) over the SmolLM2 vocabulary."""
    from flora.models import tiny_llama

    return tiny_llama(tokenizer, seed=0)


@pytest.fixture
def token_examples() -> list[dict]:
    """Four hand-made examples of different lengths; -100 labels mark the prompt tokens."""
    rows = [
        ([1, 5, 6, 7, 8, 9, 10, 11], 3),
        ([1, 15, 16, 17, 18, 19], 2),
        ([1, 25, 26, 27, 28, 29, 30], 4),
        ([1, 35, 36, 37, 38], 1),
    ]
    return [
        {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "category": "all"}
        for ids, prompt in rows
    ]
