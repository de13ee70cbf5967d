"""Greedy answers to instruction prompts, for before/after samples."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.data.prompts import Template, encode_prompt
from flora.devices import autocast_context

__all__ = ["generate_answer"]


def generate_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    context: str = "",
    *,
    template: Template = "chat",
    max_new_tokens: int = 48,
    precision: str = "fp32",
) -> str:
    """The model's greedy answer to one prompt, decoded without special tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(instruction, context, tokenizer, template)], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast_context(precision, device.type):
        output = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.train(was_training)
    return str(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)).strip()
