"""Prompt templates and loss masking: labels are -100 exactly on the prompt."""

from __future__ import annotations

from typing import Any

import pytest

from flora.data import (
    IGNORE_INDEX,
    Template,
    encode_example,
    encode_prompt,
    encode_records,
    format_prompt,
)
from flora.errors import FloraError

RECORDS = [
    {"instruction": "Name a primary colour.", "context": "", "response": "Red.", "category": "qa"},
    {
        "instruction": "When was the tower finished?",
        "context": "The Eiffel Tower was finished in 1889 for the World's Fair.",
        "response": "It was finished in 1889.",
        "category": "closed_qa",
    },
]


def assert_masked_on_prompt(example: dict[str, Any], prompt: list[int]) -> None:
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) :] == ids[len(prompt) :]
    assert IGNORE_INDEX not in labels[len(prompt) :]


@pytest.mark.parametrize("template", ["chat", "alpaca"])
@pytest.mark.parametrize("record", RECORDS, ids=["no-context", "context"])
def test_labels_mask_exactly_the_prompt(
    smollm2_tokenizer: Any, template: Template, record: dict[str, str]
) -> None:
    # Prepare
    prompt = encode_prompt(record["instruction"], record["context"], smollm2_tokenizer, template)

    # Execute
    example = encode_example(record, smollm2_tokenizer, template=template, max_length=512)

    # Assert
    assert_masked_on_prompt(dict(example), prompt)
    answer = smollm2_tokenizer.decode(example["input_ids"][len(prompt) :])
    assert answer.startswith(record["response"])
    assert example["input_ids"][len(prompt) :].count(smollm2_tokenizer.eos_token_id) == 1
    assert example["category"] == record["category"]


def test_chat_ids_equal_the_tokenizers_own_chat_rendering(smollm2_tokenizer: Any) -> None:
    record = RECORDS[1]
    user = f"{record['instruction']}\n\n{record['context']}"
    turns = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": record["response"]},
    ]

    example = encode_example(record, smollm2_tokenizer, template="chat", max_length=512)

    expected = smollm2_tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False)
    assert example["input_ids"] == list(expected)
    assert smollm2_tokenizer.decode(example["input_ids"]).endswith(
        "It was finished in 1889.<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("template", "record", "ending"),
    [
        (
            "chat",
            RECORDS[0],
            "<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\n",
        ),
        ("alpaca", RECORDS[0], "### Instruction:\nName a primary colour.\n\n### Response:\n"),
        (
            "alpaca",
            RECORDS[1],
            "the World's Fair.\n\n### Response:\n",
        ),
    ],
)
def test_format_prompt(
    smollm2_tokenizer: Any, template: Template, record: dict[str, str], ending: str
) -> None:
    text = format_prompt(record["instruction"], record["context"], smollm2_tokenizer, template)

    assert text.endswith(ending)
    if template == "alpaca":
        assert text.startswith("Below is an instruction that describes a task")


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_truncation_keeps_the_start(smollm2_tokenizer: Any, template: Template) -> None:
    # Prepare
    record = RECORDS[1]
    full = encode_example(record, smollm2_tokenizer, template=template, max_length=4096)
    prompt = encode_prompt(record["instruction"], record["context"], smollm2_tokenizer, template)
    max_length = len(prompt) + 3

    # Execute
    cut = encode_example(record, smollm2_tokenizer, template=template, max_length=max_length)

    # Assert
    assert cut["input_ids"] == full["input_ids"][:max_length]
    assert cut["labels"] == full["labels"][:max_length]
    assert_masked_on_prompt(dict(cut), prompt)


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_examples_without_response_tokens_are_dropped_and_counted(
    smollm2_tokenizer: Any, template: Template
) -> None:
    # Prepare: a max_length that fits the short record's prompt+answer but not the long prompt
    short = encode_example(RECORDS[0], smollm2_tokenizer, template=template, max_length=4096)
    max_length = len(short["input_ids"])

    # Execute
    encoded = encode_records(RECORDS, smollm2_tokenizer, template=template, max_length=max_length)

    # Assert
    assert encoded.dropped == 1
    assert [e["category"] for e in encoded.examples] == ["qa"]


def test_all_dropped_is_an_error(smollm2_tokenizer: Any) -> None:
    with pytest.raises(FloraError, match=r"raise data\.max_length"):
        encode_records(RECORDS, smollm2_tokenizer, template="chat", max_length=8)


@pytest.mark.parametrize(
    ("split_turns", "answer"),
    [(False, "Red.|"), (True, "Red.\x00")],
    ids=["prompt-is-prefix", "fallback-response-plus-eos"],
)
def test_chat_answer_with_and_without_prefix(
    char_tokenizer: Any, split_turns: bool, answer: str
) -> None:
    tokenizer = char_tokenizer(split_turns=split_turns)
    prompt = encode_prompt("Name a primary colour.", "", tokenizer, "chat")

    example = encode_example(RECORDS[0], tokenizer, template="chat", max_length=512)

    assert_masked_on_prompt(dict(example), prompt)
    assert "".join(map(chr, example["input_ids"][len(prompt) :])) == answer


@pytest.mark.parametrize(
    ("template", "max_length", "chat_template", "message"),
    [
        ("json", 64, "toy", r"data\.template must be one of \['chat', 'alpaca'\]"),
        ("alpaca", 0, "toy", "max_length must be a positive integer"),
        ("chat", 64, None, "use data.template='alpaca'"),
    ],
    ids=["unknown-template", "zero-length", "no-chat-template"],
)
def test_bad_settings_are_flora_errors(
    char_tokenizer: Any, template: str, max_length: int, chat_template: str | None, message: str
) -> None:
    tokenizer = char_tokenizer()
    tokenizer.chat_template = chat_template

    with pytest.raises(FloraError, match=message):
        encode_example(RECORDS[0], tokenizer, template=template, max_length=max_length)  # type: ignore[arg-type]
