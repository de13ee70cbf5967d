"""One SmolLM2 client for the training benchmarks: the packaged model and a seeded slice of
Dolly, encoded as a run encodes it (chat template, the truncation that keeps answers)."""

from __future__ import annotations

import time

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.data import Example, encode_records, load_records
from flora.data._seed import make_rng
from flora.models import load_model
from flora.training import TrainConfig, train_client


def smollm2_client(
    count: int, max_length: int, precision: str, salt: int, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[Example]]:
    """SmolLM2 in ``precision`` and ``count`` Dolly examples of at most ``max_length`` tokens
    (a permutation seeded by (seed, salt); twice as many rows read, in case some drop)."""
    model, tokenizer = load_model("smollm2", precision=precision)
    records = load_records("dolly")
    order = make_rng(seed, salt).permutation(len(records)).tolist()
    encoded = encode_records(
        [records[i] for i in order[: count * 2]], tokenizer, template="chat", max_length=max_length
    )
    return model, tokenizer, encoded.examples[:count]


def timed_epoch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    config: TrainConfig,
) -> tuple[float, float, float]:
    """One client's training (r 16 on q, v) under ``config``: (examples per CPU second,
    examples per wall second, its training loss)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_client(
        model,
        examples,
        rank=16,
        alpha=32,
        target_modules=["q_proj", "v_proj"],
        config=config,
        seed=0,
        pad_id=int(tokenizer.pad_token_id),
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(examples) / cpu, len(examples) / wall, result.train_loss
