"""A frozen base quantised through bitsandbytes (``model.quantization``): 4 = NF4 with double
quantisation (QLoRA: Dettmers et al., 2023, https://arxiv.org/abs/2305.14314), 8 = LLM.int8
(Dettmers et al., 2022, https://arxiv.org/abs/2208.07339), as FlowerTune loads its bases.

Quantised weights cannot take an update, so the target modules are left out of quantisation
and held in fp32 (``llm_int8_skip_modules``): the LoRA trains on them and every merged update
adds into them exactly, while the rest of the model (the other projections, the MLPs) stays
4- or 8-bit. The output head stays unquantised, as transformers does by default.

:func:`require_bitsandbytes` checks, before any model loads, that bitsandbytes imports, that its
native library loaded, that it supports the device, and that a 4-bit layer passes gradients back
there; each failure is a FloraError that says what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from flora.devices import DTYPES, hold_in
from flora.errors import FloraError

__all__ = ["load_quantized", "require_bitsandbytes"]

_INSTALL = "pip install 'bitsandbytes>=0.46.1' (or the flora-lora[quant] extra)"


def require_bitsandbytes(device: torch.device, bits: int = 4) -> ModuleType:
    """bitsandbytes, checked to run on ``device``; a FloraError saying why not otherwise."""
    key = f"model.quantization = {bits}"
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise FloraError(f"{key} needs bitsandbytes ({error}); {_INSTALL}") from None
    from bitsandbytes import cextension

    mock = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", None)
    if mock is not None and isinstance(getattr(cextension, "lib", None), mock):
        raise FloraError(
            f"{key}: bitsandbytes {bnb.__version__} is installed but its native library did "
            f"not load on this machine; reinstall it for {device.type} ({_INSTALL}) or set "
            "model.quantization = 0"
        )
    supported = set(getattr(bnb, "supported_torch_devices", {"cuda"}))
    if device.type not in supported:
        raise FloraError(
            f"{key}: bitsandbytes {bnb.__version__} runs on {sorted(supported)}, not on "
            f"{device.type}; use train.device = 'cuda' (or 'cpu'), or model.quantization = 0"
        )
    _check_backward(bnb, device, key)
    return bnb


def _check_backward(bnb: ModuleType, device: torch.device, key: str) -> None:
    """A 64x64 NF4 layer passes a finite, non-zero gradient back to its input on ``device``."""
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        _no_cpu_repack(layer)
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        ok = x.grad is not None and bool(torch.isfinite(x.grad).all()) and bool(x.grad.any())
    except Exception as error:  # any failure inside bitsandbytes: it cannot run here
        raise FloraError(
            f"{key}: bitsandbytes cannot run a 4-bit layer on {device} ({type(error).__name__}: "
            f"{error}); set model.quantization = 0 or run on a CUDA GPU"
        ) from None
    if not ok:
        raise FloraError(
            f"{key}: bitsandbytes' 4-bit layer passes no gradient back on {device}; set "
            "model.quantization = 0 or run on a CUDA GPU"
        )


def _no_cpu_repack(module: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On a CPU with AVX512-BF16, the first no-grad forward of a ``Linear4bit`` repacks its weight
    for a kernel that has no backward; from then on gradients stop there without an error (a
    held-out evaluation between two rounds would silently end training of the layers below).
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010


def load_quantized(
    source: str | Path,
    bits: int,
    compute: str,
    dtype: str,
    keep_fp32: Sequence[str],
    device: torch.device,
) -> PreTrainedModel:
    """The checkpoint at ``source`` with its linear layers quantised to ``bits`` on ``device``,
    computing in ``compute``; the ``keep_fp32`` modules and the head stay unquantised (fp32 for
    ``keep_fp32``, ``dtype`` for the rest)."""
    bnb = require_bitsandbytes(device, bits)
    options: dict[str, Any] = {"llm_int8_skip_modules": [*keep_fp32, "lm_head"]}
    if bits == 4:
        options |= {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": DTYPES[compute],
        }
    else:
        options |= {"load_in_8bit": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            quantization_config=BitsAndBytesConfig(**options),
            dtype=torch.float32,
            device_map={"": str(device)},
        )
    except OSError as error:
        raise FloraError(f"model {source}: could not be loaded quantised ({error})") from None
    hold_in(model, dtype, keep_fp32)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _no_cpu_repack(module)
    return model
