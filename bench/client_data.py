"""One SmolLM2 client for the training benchmarks: the packaged model and a seeded slice of
Dolly, encoded as a run encodes it (chat template, the truncation that keeps answers)."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.data import Example, encode_records, load_records
from flora.data._seed import make_rng
from flora.models import load_model


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
