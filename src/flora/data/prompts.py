"""Records to token ids, with the loss masked on the prompt.

Two templates:

- ``"chat"``: the tokenizer's own chat template; the user turn is the instruction (plus the
  context after a blank line), the assistant turn is the response.
- ``"alpaca"``: the Stanford Alpaca prompt (https://github.com/tatsu-lab/stanford_alpaca),
  then the response and the eos token.

Labels are ``-100`` on every prompt position and equal ``input_ids`` on the response, end-of-turn
token included. An example longer than ``max_length`` keeps its answer: the context is cut
first, then the instruction (flora.data.truncation), so that at least ``min_response`` response
tokens stay, and the response is cut at its end. ``encode_records`` drops only the examples
where even that fails, and counts kept, shortened and dropped rows per category.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Literal, NamedTuple, TypedDict

from flora.data.truncation import fit_prompt
from flora.errors import FloraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "TRUNCATIONS",
    "EncodedRecords",
    "Example",
    "KeptCounts",
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
TRUNCATIONS = ("keep-answer", "end")
"""``keep-answer``: cut the context, then the instruction, to keep ``min_response`` answer
tokens; ``end``: cut at the end (the reference code's rule: a long prompt leaves no answer)."""

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


class KeptCounts(NamedTuple):
    """One category's rows: kept whole, kept with the context or instruction cut, dropped."""

    whole: int
    shortened: int
    dropped: int

    @property
    def rows(self) -> int:
        return self.whole + self.shortened + self.dropped


class EncodedRecords(NamedTuple):
    """Examples that kept at least one response token, and each category's counts."""

    examples: list[Example]
    counts: dict[str, KeptCounts]
    kept: list[int]  # each example's position among the records given

    @property
    def dropped(self) -> int:
        return sum(c.dropped for c in self.counts.values())


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


class Encoded(NamedTuple):
    example: Example | None  # None: not even min_response answer tokens fit
    shortened: str  # "", "context" or "instruction": what was cut to fit


def encode_example(
    record: Mapping[str, str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: Template,
    max_length: int,
    min_response: int = 1,
    truncation: str = "keep-answer",
) -> Encoded:
    """Tokenise one record; labels are IGNORE_INDEX on the prompt. When it is too long, the
    context, then the instruction, is cut so that ``min_response`` answer tokens (or the whole
    answer, if shorter) stay."""
    _check_template(template)
    if max_length < 1:
        raise FloraError(f"data.max_length must be a positive integer, got {max_length}")
    instruction = record["instruction"].strip()
    context = record.get("context", "").strip()
    response = record["response"].strip()
    prompt = encode_prompt(instruction, context, tokenizer, template)
    answer = _answer(tokenizer, template, instruction, context, response, prompt)
    shortened = ""
    keep = min(max(min_response, 1), len(answer))
    if truncation not in TRUNCATIONS:
        raise FloraError(f"data.truncation must be one of {list(TRUNCATIONS)}, got {truncation!r}")
    if truncation == "keep-answer" and len(prompt) + keep > max_length:
        fitted = fit_prompt(
            instruction,
            context,
            prompt_length=lambda i, c: len(encode_prompt(i, c, tokenizer, template)),
            head=_head(tokenizer),
            size=_size(tokenizer),
            budget=max_length - keep,
        )
        if fitted is None:
            return Encoded(None, "")
        instruction, context, shortened = fitted
        prompt = encode_prompt(instruction, context, tokenizer, template)
        answer = _answer(tokenizer, template, instruction, context, response, prompt)
    input_ids = (prompt + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return Encoded(None, shortened)
    example = Example(input_ids=input_ids, labels=labels, category=record.get("category", "all"))
    return Encoded(example, shortened)


def encode_records(
    records: Iterable[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: Template,
    max_length: int,
    min_response: int = 1,
    truncation: str = "keep-answer",
) -> EncodedRecords:
    """Encode every record (cutting context, then instruction, to keep ``min_response`` answer
    tokens), dropping those where even that fails; counts per category."""
    kept: list[Example] = []
    positions: list[int] = []
    counts: dict[str, Counter[str]] = {}
    for position, record in enumerate(records):
        encoded = encode_example(
            record,
            tokenizer,
            template=template,
            max_length=max_length,
            min_response=min_response,
            truncation=truncation,
        )
        category = counts.setdefault(str(record.get("category", "all")), Counter())
        if encoded.example is None:
            category["dropped"] += 1
            continue
        kept.append(encoded.example)
        positions.append(position)
        category["shortened" if encoded.shortened else "whole"] += 1
    tally = {k: KeptCounts(c["whole"], c["shortened"], c["dropped"]) for k, c in counts.items()}
    result = EncodedRecords(kept, tally, positions)
    if result.dropped and not kept:
        raise FloraError(
            f"data.max_length={max_length} leaves no response token in any of {result.dropped} "
            "examples"
            + (", even with the context and instruction cut" if truncation == "keep-answer" else "")
            + "; raise data.max_length"
        )
    return result


def _answer(
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    instruction: str,
    context: str,
    response: str,
    prompt: list[int],
) -> list[int]:
    if template == "alpaca":
        return [*_tokenize(tokenizer, response, add_special_tokens=False), _eos_id(tokenizer)]
    return _chat_answer(tokenizer, instruction, context, response, prompt)


def _head(tokenizer: PreTrainedTokenizerBase) -> Callable[[str, int], str]:
    """The text of a text's first n tokens (decoded, so a cut never splits a character)."""

    def head(text: str, n: int) -> str:
        ids = _tokenize(tokenizer, text, add_special_tokens=False)
        return str(tokenizer.decode(ids[:n], skip_special_tokens=True))

    return head


def _size(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], int]:
    return lambda text: len(_tokenize(tokenizer, text, add_special_tokens=False))


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
