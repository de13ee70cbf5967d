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
    example = encode_example(record, smollm2_tokenizer, template=template, max_length=512).example

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

    example = encode_example(record, smollm2_tokenizer, template="chat", max_length=512).example

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
    full = encode_example(record, smollm2_tokenizer, template=template, max_length=4096).example
    prompt = encode_prompt(record["instruction"], record["context"], smollm2_tokenizer, template)
    max_length = len(prompt) + 3

    # Execute
    cut = encode_example(record, smollm2_tokenizer, template=template, max_length=max_length)
    cut = cut.example

    # Assert
    assert cut["input_ids"] == full["input_ids"][:max_length]
    assert cut["labels"] == full["labels"][:max_length]
    assert_masked_on_prompt(dict(cut), prompt)


LONG = {
    "instruction": "Summarise the passage.",
    "context": " ".join(f"Sentence {i} says something about the tower." for i in range(40)),
    "response": "The passage describes the tower in forty sentences of roughly equal length.",
    "category": "summarization",
}


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_a_long_context_is_cut_so_the_answer_stays(smollm2_tokenizer: Any, template: Template):
    # Prepare: room for the instruction and 8 answer tokens, not for the whole context
    full = encode_example(LONG, smollm2_tokenizer, template=template, max_length=4096)
    assert full.example is not None and not full.shortened
    max_length = 96
    # Execute
    cut = encode_example(
        LONG, smollm2_tokenizer, template=template, max_length=max_length, min_response=8
    )
    # Assert: exactly max_length tokens, >= 8 of them answer, the context's start kept
    assert cut.shortened == "context" and cut.example is not None
    ids, labels = cut.example["input_ids"], cut.example["labels"]
    answer = [label for label in labels if label != IGNORE_INDEX]
    assert len(ids) == max_length and len(answer) >= 8
    text = smollm2_tokenizer.decode(ids)
    assert "Sentence 0 says" in text and "Sentence 39" not in text
    assert smollm2_tokenizer.decode(answer).startswith("The passage describes")
    # the old rule (cut the end) would have kept no answer token at all
    assert all(label == IGNORE_INDEX for label in full.example["labels"][:max_length])


def test_a_long_instruction_is_cut_when_there_is_no_context(smollm2_tokenizer: Any):
    record = {"instruction": LONG["context"], "context": "", "response": "Yes.", "category": "x"}
    cut = encode_example(record, smollm2_tokenizer, template="chat", max_length=64, min_response=8)
    assert cut.shortened == "instruction" and cut.example is not None
    answer = [label for label in cut.example["labels"] if label != IGNORE_INDEX]
    assert smollm2_tokenizer.decode(answer).startswith("Yes.")  # all of a short answer kept
    assert len(cut.example["input_ids"]) <= 64


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_examples_that_cannot_fit_are_dropped_and_counted(
    smollm2_tokenizer: Any, template: Template
):
    # Prepare: room for the template and 40 tokens, then for the template and 5
    records = [*RECORDS, LONG]
    overhead = len(encode_prompt("", "", smollm2_tokenizer, template))
    # Execute
    tight = encode_records(
        records, smollm2_tokenizer, template=template, max_length=overhead + 40, min_response=8
    )
    mixed = encode_records(
        [RECORDS[0], LONG],
        smollm2_tokenizer,
        template=template,
        max_length=overhead + 5,
        min_response=8,
    )
    # Assert: every row kept, the long one shortened; counts per category
    assert tight.dropped == 0 and len(tight.examples) == 3
    assert tight.counts["summarization"] == (0, 1, 0)
    assert tight.counts["qa"] == (1, 0, 0) and tight.counts["qa"].rows == 1
    # a 3-token answer fits beside a cut instruction; 8 answer tokens do not
    assert mixed.counts == {"qa": (0, 1, 0), "summarization": (0, 0, 1)}
    with pytest.raises(FloraError, match="even with the context and instruction cut"):
        encode_records(
            [LONG], smollm2_tokenizer, template=template, max_length=overhead + 2, min_response=8
        )


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

    example = encode_example(RECORDS[0], tokenizer, template="chat", max_length=512).example

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
