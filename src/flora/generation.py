"""Greedy answers to instruction prompts, for before/after samples.

Plain greedy decoding sends a 135M model into loops ("The Shawshanner" five times, before and
after training alike), which hides what training changed. Answers are greedy with transformers'
``no_repeat_ngram_size`` (no 3-gram twice, by default): on SmolLM2 it ends the loops and leaves
loop-free answers as greedy gives them.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.data.prompts import Template, encode_prompt
from flora.devices import autocast_context

__all__ = ["NO_REPEAT_NGRAM", "generate_answer"]

NO_REPEAT_NGRAM = 3


def generate_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    context: str = "",
    *,
    template: Template = "chat",
    max_new_tokens: int = 48,
    precision: str = "fp32",
    no_repeat_ngram_size: int = NO_REPEAT_NGRAM,
) -> str:
    """The model's greedy answer to one prompt (no n-gram of ``no_repeat_ngram_size`` tokens
    twice; 0: plain greedy), decoded without special tokens. ``max_new_tokens`` is bounded by
    the model's context (``max_position_embeddings``) less the prompt."""
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(instruction, context, tokenizer, template)], device=device)
    window = getattr(model.config, "max_position_embeddings", None)
    if isinstance(window, int) and window > 0:
        max_new_tokens = max(1, min(max_new_tokens, window - ids.shape[1]))
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast_context(precision, device.type):
        output = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            no_repeat_ngram_size=no_repeat_ngram_size,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.train(was_training)
    return str(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)).strip()
