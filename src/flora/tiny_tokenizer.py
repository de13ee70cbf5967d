"""The tiny random models' tokenizer: shipped with flora, so a tiny run needs no download and no
model package.

It is SmolLM2's byte-level BPE cut to its first 4,096 tokens: the 17 special tokens, the 235
byte symbols and the first 3,844 merges, whose results are exactly the ids below 4,096 (SmolLM2
numbers merge i's token 252 + i), so it splits text as SmolLM2 would with only those merges.
It keeps SmolLM2's special tokens (bos ``<|im_start|>``, eos and pad ``<|im_end|>``) and its
ChatML chat template, less the default system line ("You are a helpful AI assistant named
SmolLM..."), which a random model has no use for and which would take 31 of a tiny config's
few tokens. The vocabulary is package data (``tiny_tokenizer.json``, the ``tokenizers``
library's format); rebuild it from the SmolLM2 checkpoint with

    python scripts/rebuild_tiny_tokenizer.py    # writes src/flora/tiny_tokenizer.json

(a script, not this module's ``__main__``: finding SmolLM2 needs flora.models, which imports
this module).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

__all__ = ["CHAT_TEMPLATE", "TOKENIZER_FILE", "VOCAB_SIZE", "derive", "tiny_tokenizer"]

TOKENIZER_FILE = Path(__file__).resolve().parent / "tiny_tokenizer.json"
VOCAB_SIZE = 4096
_FIRST_MERGE_ID = 252  # SmolLM2: 17 special tokens, then 235 byte symbols, then one id a merge
CHAT_TEMPLATE = (  # SmolLM2-135M-Instruct's ChatML, without its default system line
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer over the shipped vocabulary, padding on the right."""
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def derive(smollm2: dict[str, Any], size: int = VOCAB_SIZE) -> dict[str, Any]:
    """SmolLM2's ``tokenizer.json`` (parsed) cut to its first ``size`` ids."""
    model = smollm2["model"]
    merges = model["merges"][: size - _FIRST_MERGE_ID]
    made = [model["vocab"]["".join(pair)] for pair in merges]
    if made != list(range(_FIRST_MERGE_ID, size)):  # the numbering this cut relies on
        raise ValueError("this tokenizer.json does not number its merges as SmolLM2's does")
    out = copy.deepcopy(smollm2)
    out["model"]["vocab"] = {token: i for token, i in model["vocab"].items() if i < size}
    out["model"]["merges"] = merges
    out["added_tokens"] = [t for t in smollm2["added_tokens"] if t["id"] < size]
    return out
