"""LoRA adapters on disk, in PEFT's own format.

In memory an adapter is :data:`flora.factors.Adapter` (module -> ``LoraFactors``); the factor
types and the tensor codec live in :mod:`flora.factors`, which needs torch only. This module adds
what needs peft and safetensors' file I/O.

On disk an adapter is a PEFT directory: ``adapter_model.safetensors`` (keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``) and ``adapter_config.json``
(``r``/``rank_pattern``, ``lora_alpha``/``alpha_pattern``, ``use_rslora``). lora_A is paired with
lora_B by key name, never by shape: a rank can equal a layer dimension. Pickle files
(``adapter_model.bin``) are refused: untrusted bytes load through safetensors only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flora.errors import FloraError
from flora.factors import Adapter, LoraFactors, adapter_to_tensors, lora_scaling, pair_factors
from flora.io import atomic_write, atomic_write_json

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PeftAdapter",
    "adapter_from_state_dict",
    "adapter_to_state_dict",
    "load_peft_adapter",
    "peft_config_for",
    "save_peft_adapter",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."  # PEFT's saved keys: base_model.model.<module>.lora_A.weight


@dataclass
class PeftAdapter:
    """An adapter read from a PEFT directory, with the config it came with."""

    modules: Adapter
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _declared(config: dict[str, Any], module: str, source: str) -> tuple[int, float]:
    """The (rank, alpha) that ``config`` declares for ``module``, resolved the way PEFT does;
    a value of the wrong type is a FloraError naming the field."""
    where = f"{source}: adapter_config.json"
    patterns = {}
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            raise FloraError(
                f"{where}: {name} must be a table of module -> number, got {pattern!r}"
            )
        patterns[name] = pattern
    rank_key = get_pattern_key(list(patterns["rank_pattern"]), module)
    alpha_key = get_pattern_key(list(patterns["alpha_pattern"]), module)
    rank = patterns["rank_pattern"].get(rank_key, config.get("r", 8))
    alpha = patterns["alpha_pattern"].get(alpha_key, config.get("lora_alpha", 8))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise FloraError(
            f"{where}: the rank of '{module}' (r / rank_pattern) must be an "
            f"integer >= 1, got {rank!r}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise FloraError(
            f"{where}: the alpha of '{module}' (lora_alpha / alpha_pattern) must be "
            f"a finite number, got {alpha!r}"
        )
    return rank, float(alpha)


def adapter_from_state_dict(
    state: dict[str, torch.Tensor], config: dict[str, Any], *, source: str = "adapter"
) -> Adapter:
    """Pair lora_A/lora_B tensors by key and attach each module's scaling from ``config``."""
    parts = {m.removeprefix(_PREFIX): pair for m, pair in pair_factors(state, "", source).items()}
    if not parts:
        raise FloraError(f"{source}: holds no lora_A/lora_B weights; is it a LoRA adapter?")
    use_rslora = bool(config.get("use_rslora", False))
    modules: Adapter = {}
    for module in sorted(parts):
        a, b = parts[module]["A"], parts[module]["B"]
        rank, alpha = _declared(config, module, source)
        for name, tensor in (("lora_A", a), ("lora_B", b)):
            if not tensor.is_floating_point():
                raise FloraError(
                    f"{source}: module '{module}' {name} has dtype {tensor.dtype}; LoRA factors "
                    "are floating point (fp32, bf16 or fp16)"
                )
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise FloraError(
                f"{source}: module '{module}' has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, but the config declares r={rank} (expected A (r, in), "
                "B (out, r)); fix r/rank_pattern in adapter_config.json or the weights"
            )
        modules[module] = LoraFactors(a.float(), b.float(), lora_scaling(alpha, rank, use_rslora))
    return modules


def adapter_to_state_dict(modules: Adapter) -> dict[str, torch.Tensor]:
    """PEFT's saved key layout: ``base_model.model.<module>.lora_{A,B}.weight``."""
    return adapter_to_tensors(modules, _PREFIX)


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FloraError(f"{directory}: no {ADAPTER_CONFIG}; save the adapter with peft")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FloraError(f"{config_path}: not valid JSON ({error}); re-save the adapter") from None
    except RecursionError:
        raise FloraError(
            f"{config_path}: JSON nested too deep to read; re-save the adapter with peft"
        ) from None
    if not isinstance(config, dict):
        raise FloraError(f"{config_path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FloraError(f"{config_path}: peft_type is {peft_type}; flora reads LoRA adapters")
    if config.get("use_dora"):
        raise FloraError(f"{config_path}: use_dora is set; DoRA adapters are not supported")
    return config


def load_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read a PEFT LoRA directory; safetensors only, with every problem reported as FloraError."""
    directory = Path(path)
    if not directory.is_dir():
        raise FloraError(f"{directory}: no such adapter directory")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (directory / "adapter_model.bin").exists():
            raise FloraError(
                f"{directory}: only adapter_model.bin (a pickle) is present; flora never loads "
                "pickles: re-save with save_pretrained(..., safe_serialization=True)"
            )
        raise FloraError(f"{directory}: no {ADAPTER_WEIGHTS}")
    config = _read_config(directory)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise FloraError(
            f"{weights}: unreadable safetensors file ({error}); it may be truncated: re-save it"
        ) from None
    modules = adapter_from_state_dict(state, config, source=str(directory))
    return PeftAdapter(modules=modules, config=config, path=directory)


def peft_config_for(modules: Adapter, template: dict[str, Any] | None = None) -> dict[str, Any]:
    """An adapter_config.json that declares each module's rank and an alpha giving its scaling.

    Ranks go to ``rank_pattern`` and alphas (scaling * r, without rsLoRA) to ``alpha_pattern``
    under each module's full name, so a stacked adapter stored with scaling 1 loads exactly.
    """
    config: dict[str, Any] = dict(template or {})
    ranks = {name: f.rank for name, f in modules.items()}
    default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in modules})
    config.update(
        peft_type="LORA",
        task_type=config.get("task_type") or "CAUSAL_LM",
        r=default_rank,
        lora_alpha=default_rank,
        rank_pattern={n: r for n, r in ranks.items() if r != default_rank},
        alpha_pattern={n: f.scaling * f.rank for n, f in modules.items()},
        use_rslora=False,
        use_dora=False,
        target_modules=config.get("target_modules") or leaf_names,
    )
    return config


def save_peft_adapter(
    path: str | Path, modules: Adapter, *, template: dict[str, Any] | None = None
) -> Path:
    """Write ``modules`` as a PEFT directory (each file written atomically) and return its path."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_to_state_dict(modules)
    atomic_write(
        directory / ADAPTER_WEIGHTS,
        lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}),
    )
    atomic_write_json(directory / ADAPTER_CONFIG, peft_config_for(modules, template))
    return directory
