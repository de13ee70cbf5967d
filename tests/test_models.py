"""flora.models: built-in specs and the SmolLM2 cache (devices and dtypes: test_devices.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from flora import models
from flora.errors import FloraError
from flora.models import (
    load_model,
    smollm2_checkpoint,
    smollm2_gguf,
    tiny_llama,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tiny-llama -------------------------------------------------------------------------------


def test_tiny_llama_is_deterministic_by_seed(tokenizer) -> None:
    # Prepare / Execute
    first, again, other = (
        tiny_llama(tokenizer, 0),
        tiny_llama(tokenizer, 0),
        tiny_llama(tokenizer, 1),
    )
    # Assert
    assert _same_weights(first, again)
    assert not _same_weights(first, other)


def test_tiny_llama_shape_and_tokenizer(smollm2_dir: Path) -> None:
    model, tok = load_model("tiny-llama", seed=3, cache_dir=smollm2_dir.parents[1])
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.intermediate_size, config.max_position_embeddings) == (128, 512)
    assert config.vocab_size == len(tok) and config.tie_word_embeddings
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert model.dtype == torch.float32
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert tok.chat_template


def test_tiny_llama_does_not_disturb_global_rng(tokenizer) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(tokenizer, 7)
    assert torch.equal(torch.rand(3), expected)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["FP16", "BF16", ""])
def test_unknown_precision_names_the_valid_values(precision: str) -> None:
    with pytest.raises(FloraError, match=r"precision.*fp32, bf16, fp16, auto"):
        load_model("tiny-llama", precision=precision)


def test_missing_local_directory_names_the_spec(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FloraError, match=r"model spec .*no-such-model.*no such directory"):
        load_model(str(missing))


def test_empty_spec_is_refused() -> None:
    with pytest.raises(FloraError, match="model spec is empty"):
        load_model("")


def test_local_directory_loads_the_saved_model(tiny_model, tokenizer, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path))
    assert _same_weights(model, tiny_model)
    assert tok.pad_token_id == tokenizer.pad_token_id and tok.padding_side == "right"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("FLORA_CACHE", "/nonexistent-flora-cache")
    with pytest.raises(FloraError, match=r"flora models install smollm2"):
        smollm2_gguf()


# --- the cache (conversion stubbed out: no real weights) ----------------------------------------


def _fake_convert(gguf: Path, target: Path) -> None:
    (target / "config.json").write_text("{}")


@pytest.fixture
def stand_in_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A stand-in GGUF for the cache tests, whose conversion is stubbed (no package needed)."""
    fake = tmp_path / "stand-in.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "smollm2_gguf", lambda cache_dir=None: fake)


@pytest.mark.usefixtures("stand_in_gguf")
def test_cache_is_built_once_and_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(
        models, "_convert_gguf", lambda g, t: (calls.append(t), _fake_convert(g, t))
    )
    first = smollm2_checkpoint(tmp_path)
    second = smollm2_checkpoint(tmp_path)
    assert first == second == tmp_path / "models" / "smollm2-135m-instruct"
    assert len(calls) == 1
    assert sorted(p.name for p in first.parent.iterdir()) == ["smollm2-135m-instruct"]


@pytest.mark.usefixtures("stand_in_gguf")
def test_cache_env_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert)
    assert smollm2_checkpoint() == tmp_path / models.SMOLLM2_CACHE_SUBDIR


@pytest.mark.usefixtures("stand_in_gguf")
def test_crash_during_conversion_leaves_no_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def crash(gguf: Path, target: Path) -> None:
        (target / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError):
        smollm2_checkpoint(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []  # neither the cache nor a staging dir


@pytest.mark.usefixtures("stand_in_gguf")
def test_concurrent_winner_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another process finishes first: our rename fails, its cache stays, our staging goes."""
    target = tmp_path / models.SMOLLM2_CACHE_SUBDIR

    def racing(gguf: Path, staging: Path) -> None:
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"winner": true}')
        _fake_convert(gguf, staging)

    monkeypatch.setattr(models, "_convert_gguf", racing)
    assert smollm2_checkpoint(tmp_path) == target
    assert (target / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_foreign_directory_in_the_cache_is_reported(tmp_path: Path) -> None:
    (tmp_path / models.SMOLLM2_CACHE_SUBDIR).mkdir(parents=True)
    with pytest.raises(FloraError, match="holds no config.json"):
        smollm2_checkpoint(tmp_path)


# --- the real SmolLM2 -------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_converts_once_then_reloads_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    model, tok = load_model("smollm2", cache_dir=tmp_path)
    converted = time.perf_counter() - start
    start = time.perf_counter()
    again, _ = load_model("smollm2", cache_dir=tmp_path)
    reloaded = time.perf_counter() - start
    print(f"GGUF conversion {converted:.1f} s, cached load {reloaded:.2f} s")
    assert getattr(again, "hf_quantizer", None) is None
    assert _same_weights(model, again)
    assert sum(p.numel() for p in again.parameters()) == 134_515_008
    assert reloaded < 5.0 and reloaded < converted
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = again.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(output[0][inputs["input_ids"].shape[1] :])
    assert not any(p.name.startswith(".") for p in (tmp_path / "models").iterdir())
