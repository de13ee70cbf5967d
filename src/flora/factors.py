"""LoRA factor pairs in memory, and the one codec that turns them into flat named tensors and back.

An adapter is ``dict[str, LoraFactors]`` keyed by the module's name inside the base model
(``model.layers.0.self_attn.q_proj``). Each entry holds ``A`` (r, in), ``B`` (out, r) and the
scaling ``s`` so that the module's update is ``s * B @ A``.

This module needs torch only: the maths (``flora.aggregation``) and the round protocol
(``flora.protocol``) build on it without loading a model library. PEFT's directory format
(``adapter_model.safetensors`` + ``adapter_config.json``) lives in :mod:`flora.adapters`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from flora.errors import FloraError

__all__ = [
    "Adapter",
    "LoraFactors",
    "adapter_from_tensors",
    "adapter_to_tensors",
    "lora_scaling",
    "pair_factors",
]

# <module>.lora_A.weight, or <module>.lora_A.<adapter_name>.weight (an unsaved state dict)
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: update = scaling * B @ A."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense update scaling * B @ A, (out, in); half-precision factors (a lossy
        downlink) multiply in fp32, so every holder of them gets the same exact product."""
        B, A = self.B, self.A
        if B.dtype in (torch.float16, torch.bfloat16) or A.dtype in (torch.float16, torch.bfloat16):
            B, A = B.float(), A.float()
        return self.scaling * (B @ A)

    def with_scaling(self, scaling: float) -> LoraFactors:
        """The same update expressed with another scaling (B is rescaled)."""
        if scaling == self.scaling:
            return self
        return LoraFactors(self.A, self.B * (self.scaling / scaling), scaling)

    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()


Adapter = dict[str, LoraFactors]


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


# --- the one codec: module -> factors as flat named tensors, and back --------------------------
# ``<prefix><module>.lora_A.weight`` (r, in) and ``<prefix><module>.lora_B.weight`` (out, r):
# PEFT's own layout. PEFT files use the prefix "base_model.model.", checkpoints and Flower records
# their own; scalings travel beside the tensors (PEFT: adapter_config.json).


def adapter_to_tensors(adapter: Adapter, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every module's A and B under ``prefix``, detached and contiguous."""
    tensors: dict[str, torch.Tensor] = {}
    for module, factors in adapter.items():
        tensors[f"{prefix}{module}.lora_A.weight"] = factors.A.detach().contiguous()
        tensors[f"{prefix}{module}.lora_B.weight"] = factors.B.detach().contiguous()
    return tensors


def pair_factors(
    tensors: dict[str, torch.Tensor], prefix: str, source: str
) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"A": ..., "B": ...} of the LoRA tensors under ``prefix`` (others refused).

    lora_A is paired with lora_B by key name, never by shape: a rank can equal a layer dimension.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            continue
        match = _KEY.match(key[len(prefix) :])
        if match is None:
            what = "DoRA magnitude" if "lora_magnitude_vector" in key else "non-LoRA"
            raise FloraError(
                f"{source}: tensor '{key}' is a {what} weight; flora aggregates plain LoRA factors "
                "of linear layers only (no DoRA, embedding LoRA, lora_bias or modules_to_save)"
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    for module, pair in parts.items():
        if "A" not in pair or "B" not in pair:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FloraError(f"{source}: module '{module}' has no {missing} weight; re-save it")
    return parts


def adapter_from_tensors(
    tensors: dict[str, torch.Tensor],
    prefix: str = "",
    scaling: float = 1.0,
    *,
    source: str = "adapter",
) -> Adapter:
    """What :func:`adapter_to_tensors` wrote under ``prefix``, every module at ``scaling``."""
    parts = pair_factors(tensors, prefix, source)
    if not parts:
        raise FloraError(f"{source} holds no LoRA factors under '{prefix}'; check the sender")
    return {m: LoraFactors(parts[m]["A"], parts[m]["B"], scaling) for m in sorted(parts)}
