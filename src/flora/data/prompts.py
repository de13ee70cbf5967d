"""Records to token ids, with the loss masked on the prompt.

Two templates:

- ``"chat"``: the tokenizer's own chat template; the user turn is the instruction (plus the
  context after a blank line), the assistant turn is the response.
- ``"alpaca"``: the Stanford Alpaca prompt (https://github.com/tatsu-lab/stanford_alpaca),
  then the response and the eos token.

Labels are ``-100`` on every prompt position and equal ``input_ids`` on the response, end-of-turn
token included. Truncation keeps the start and cuts the end; ``encode_records`` drops examples
left with no response token and counts them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal, NamedTuple, TypedDict

from flora.errors import FloraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "EncodedRecords",
    "Example",
    "Template",
    "encode_example",
    "encode_prompt",
    "encode_records",
    "format_prompt",
]

IGNORE_INDEX = -100
"""Label value that ``torch.nn.CrossEntropyLoss`` skips."""

Template = Literal["chat", "alpaca"]
TEMPLATES: tuple[Template, ...] = ("chat", "alpaca")

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class Example(TypedDict):
    """One tokenised training example."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt, == input_ids on the response
    category: str


class EncodedRecords(NamedTuple):
    """Examples that kept at least one response token, and how many were dropped."""

    examples: list[Example]
    dropped: int


def format_prompt(
    instruction: str, context: str, tokenizer: PreTrainedTokenizerBase, template: Template
) -> str:
    """The prompt text a model continues with its response (for generation)."""
    _check_template(template)
    instruction, context = instruction.strip(), context.strip()
    if template == "alpaca":
        if context:
            return _ALPACA_WITH_INPUT.format(instruction=instruction, context=context)
        return _ALPACA_NO_INPUT.format(instruction=instruction)
    return _render_chat(tokenizer, [_user_turn(instruction, context)], add_generation_prompt=True)


def encode_prompt(
    instruction: str, context: str, tokenizer: PreTrainedTokenizerBase, template: Template
) -> list[int]:
    """Token ids of the prompt exactly as training sees them (for generation)."""
    text = format_prompt(instruction, context, tokenizer, template)
    return _tokenize(tokenizer, text, add_special_tokens=template == "alpaca")


def encode_example(
    record: Mapping[str, str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: Template,
    max_length: int,
) -> Example:
    """Tokenise one record; labels are IGNORE_INDEX on the prompt.

    The result may hold no response token when the prompt alone reaches ``max_length``;
    ``encode_records`` drops those.
    """
    _check_template(template)
    if max_length < 1:
        raise FloraError(f"data.max_length must be a positive integer, got {max_length}")
    instruction = record["instruction"].strip()
    context = record.get("context", "").strip()
    response = record["response"].strip()
    prompt = encode_prompt(instruction, context, tokenizer, template)
    if template == "alpaca":
        answer = [*_tokenize(tokenizer, response, add_special_tokens=False), _eos_id(tokenizer)]
    else:
        answer = _chat_answer(tokenizer, instruction, context, response, prompt)
    input_ids = (prompt + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    return Example(input_ids=input_ids, labels=labels, category=record.get("category", "all"))


def encode_records(
    records: Iterable[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: Template,
    max_length: int,
) -> EncodedRecords:
    """Encode every record, dropping (and counting) those whose response was truncated away."""
    kept: list[Example] = []
    dropped = 0
    for record in records:
        example = encode_example(record, tokenizer, template=template, max_length=max_length)
        if any(label != IGNORE_INDEX for label in example["labels"]):
            kept.append(example)
        else:
            dropped += 1
    if dropped and not kept:
        raise FloraError(
            f"data.max_length={max_length} leaves no response token in any of {dropped} "
            f"examples; raise data.max_length"
        )
    return EncodedRecords(examples=kept, dropped=dropped)


def _chat_answer(
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    context: str,
    response: str,
    prompt: list[int],
) -> list[int]:
    """Ids of the assistant turn: the full conversation's ids after the prompt's."""
    turns = [_user_turn(instruction, context), {"role": "assistant", "content": response}]
    full_text = _render_chat(tokenizer, turns, add_generation_prompt=False)
    full = _tokenize(tokenizer, full_text, add_special_tokens=False)
    if full[: len(prompt)] == prompt and len(full) > len(prompt):
        return full[len(prompt) :]
    # The template renders the prompt differently once the answer follows, or the tokenizer
    # merges tokens across the boundary: tokenise the answer text on its own.
    prompt_text = format_prompt(instruction, context, tokenizer, "chat")
    if full_text.startswith(prompt_text):
        answer_text = full_text[len(prompt_text) :]
        return _tokenize(tokenizer, answer_text, add_special_tokens=False)
    return [*_tokenize(tokenizer, response, add_special_tokens=False), _eos_id(tokenizer)]


def _user_turn(instruction: str, context: str) -> dict[str, str]:
    content = f"{instruction}\n\n{context}" if context else instruction
    return {"role": "user", "content": content}


def _render_chat(
    tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], *, add_generation_prompt: bool
) -> str:
    """The chat template's text (transformers 5 returns a BatchEncoding when tokenize=True)."""
    if not getattr(tokenizer, "chat_template", None):
        raise FloraError(
            "data.template='chat' needs a tokenizer with a chat template; "
            "use data.template='alpaca' for base models"
        )
    text = tokenizer.apply_chat_template(
        turns, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    if not isinstance(text, str):
        raise FloraError(f"chat template rendered {type(text).__name__}, expected str")
    return text


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, text: str, *, add_special_tokens: bool
) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return [int(i) for i in ids]


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise FloraError(
            "the tokenizer has no eos_token_id; set tokenizer.eos_token before encoding"
        )
    return eos


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise FloraError(f"data.template must be one of {list(TEMPLATES)}, got {template!r}")
