"""Sample answers: greedy, with no n-gram twice (flora.generation)."""

from __future__ import annotations

from typing import Any

from flora.generation import generate_answer
from flora.models import load_model


def _ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def test_no_trigram_repeats_where_plain_greedy_loops(torch_single_thread):
    model, tokenizer = load_model("tiny-llama", seed=0)  # a random model loops at once
    real, produced = model.generate, []

    def recording(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        produced.append(out[0, kwargs["input_ids"].shape[1] :].tolist())
        return out

    model.generate = recording  # type: ignore[method-assign]
    for n in (0, 3):
        generate_answer(
            model, tokenizer, "Name a primary colour.", max_new_tokens=30, no_repeat_ngram_size=n
        )
    plain, guarded = produced
    assert len(set(_ngrams(plain, 3))) < len(_ngrams(plain, 3))  # plain greedy repeats itself
    assert len(set(_ngrams(guarded, 3))) == len(_ngrams(guarded, 3)) == 28
