"""Where a run computes and in which precision: ``train.device`` and ``train.precision`` resolved
against the hardware that is there.

- :func:`resolve_device`: ``auto`` is CUDA if torch sees a GPU, else MPS, else the CPU; a named
  device that is not there is a clear error, never a crash deep inside torch.
- :func:`resolve_precision`: bf16 autocast where the device runs it, else fp16 (with a gradient
  scaler) on a GPU without bf16, else fp32. A base held in bf16/fp16 runs in its own precision.
- :func:`autocast_context` and :func:`grad_scaler`: what the forward and backward passes use.
- :func:`hold_in`: a base's weights held in bf16/fp16, its target modules kept in fp32.
- :func:`resolve_base_dtype`: ``model.dtype = "auto"``: on a GPU training in bf16, a bf16 base
  (its target modules kept fp32 for exact merges); fp32 everywhere else.
- :func:`resolve_attention`: ``model.attention = "auto"``: flash-attention 2 where it is
  installed and the base is half precision on CUDA, else PyTorch's SDPA.
- :func:`enable_tf32`: TF32 matmuls on CUDA for what stays fp32 (``train.tf32``).
- :func:`make_deterministic`: torch's deterministic algorithms (``train.deterministic``).

docs/devices.md lists the supported combinations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch

from flora.config import ATTENTIONS, PRECISIONS
from flora.errors import FloraError

__all__ = [
    "ATTENTIONS",
    "DTYPES",
    "Precision",
    "autocast_context",
    "enable_tf32",
    "grad_scaler",
    "hold_in",
    "make_deterministic",
    "resolve_attention",
    "resolve_base_dtype",
    "resolve_device",
    "resolve_precision",
]

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str, key: str = "train.device") -> torch.device:
    """The torch device for ``spec`` ("auto", "cpu", "cuda", "cuda:N", "mps"), checked present."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise FloraError(f"{key} = 'mps' but this torch sees no Apple GPU; use 'auto' or 'cpu'")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        suffix = spec[5:]
        if spec != "cuda" and not suffix.isdigit():
            raise FloraError(f"{key} = {spec!r}: write 'cuda' or 'cuda:N' with N a GPU index")
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise FloraError(
                f"{key} = {spec!r} but torch sees no CUDA GPU (torch {torch.__version__} is "
                f"{build}); use {key} = 'auto' or 'cpu', or install a CUDA build of torch "
                "(README: Install on a CUDA machine)"
            )
        count = torch.cuda.device_count()
        index = int(suffix) if suffix else torch.cuda.current_device()
        if index >= count:
            raise FloraError(
                f"{key} = {spec!r} but this machine has {count} CUDA GPU(s) "
                f"(cuda:0..cuda:{count - 1}); pick one of them or 'auto'"
            )
        return torch.device("cuda", index)
    raise FloraError(f"{key} = {spec!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def _native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX512-BF16, AMX-BF16 or SVE-BF16)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:  # torch < 2.8: only the vector ISA name is exposed
        return False
    caps = get_capabilities()
    return any(bool(caps.get(flag, False)) for flag in ("avx512_bf16", "amx_bf16", "sve_bf16"))


def _cuda_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 natively (compute capability 8.0+: Ampere and later)."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_precision(
    precision: str, device: torch.device | str = "cpu", base_dtype: str = "fp32"
) -> Precision:
    """The autocast precision on ``device``: ``auto`` picks the fastest one it runs well; a
    base held in bf16/fp16 (``base_dtype``) runs in its own precision."""
    if precision not in PRECISIONS:
        raise FloraError(
            f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}; "
            "use 'auto' to pick the best one this device runs"
        )
    device = torch.device(device)
    if base_dtype == "auto":  # an auto base follows the precision, never the other way round
        base_dtype = "fp32"
    if precision == "auto" and base_dtype in ("bf16", "fp16"):
        precision = base_dtype
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if _cuda_bf16(device) else "fp16"
        if device.type == "cpu" and _native_bf16():
            return "bf16"
        return "fp32"  # MPS: fp32 unless asked (its bf16/fp16 autocast is young)
    if precision == "bf16" and device.type == "cuda" and not _cuda_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise FloraError(
            f"train.precision = 'bf16' but {device} ({name}) has no native bf16; use "
            "'fp16' (trained with a gradient scaler) or 'auto'"
        )
    return "bf16" if precision == "bf16" else "fp16" if precision == "fp16" else "fp32"


def autocast_context(
    precision: str, device_type: str = "cpu"
) -> contextlib.AbstractContextManager[object]:
    """The context forward passes run under: bf16/fp16 autocast on ``device_type``, or nothing
    for fp32."""
    if precision == "auto":
        precision = resolve_precision(precision, device_type)
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type, dtype=DTYPES[precision])
    if precision != "fp32":
        resolve_precision(precision)  # raises the clear error
    return contextlib.nullcontext()


def grad_scaler(precision: str, device_type: str) -> torch.amp.GradScaler:
    """A gradient scaler for fp16 (whose small gradients would underflow); a no-op otherwise."""
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")


def hold_in(model: torch.nn.Module, dtype: str, keep_fp32: Sequence[str]) -> None:
    """Cast the model's floating-point parameters to ``dtype``, except those of the modules whose
    leaf name is in ``keep_fp32`` (the fp32 master copies of the target modules). Quantised
    parameters (integer storage) and buffers are left as they are."""
    if dtype == "fp32":
        return
    keep = set(keep_fp32)
    kept = {
        id(param)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in keep
        for param in module.parameters(recurse=False)
    }  # a tied weight (lm_head and the embeddings) is kept if either module is
    for param in model.parameters():  # each shared parameter once
        if param.is_floating_point() and type(param) is torch.nn.Parameter:
            # the kept fp32 weights are copied too: a view into the memory-mapped checkpoint
            # would keep all of its pages mapped (resident), not only theirs
            param.data = param.data.clone() if id(param) in kept else param.data.to(DTYPES[dtype])


def resolve_base_dtype(dtype: str, device: torch.device | str, precision: str) -> str:
    """What the frozen base is held in: ``dtype`` as given, or for "auto" bf16 on a CUDA GPU
    whose training precision resolves to bf16 (half the memory and bandwidth; the target modules
    stay fp32, so merges are exact), fp32 everywhere else (the CPU's default is unchanged)."""
    if dtype != "auto":
        return dtype
    device = torch.device(device)
    if device.type == "cuda" and resolve_precision(precision, device) == "bf16":
        return "bf16"
    return "fp32"


def resolve_attention(attention: str, device: torch.device | str, base_dtype: str) -> str:
    """transformers' ``attn_implementation``: "auto" is flash-attention 2 where the package is
    installed and a half-precision base runs on CUDA (its kernels need both), else SDPA."""
    if attention not in ATTENTIONS:
        raise FloraError(f"model.attention must be one of {ATTENTIONS}, got {attention!r}")
    if attention != "auto":
        return attention
    import importlib.util

    device = torch.device(device)
    flash = importlib.util.find_spec("flash_attn") is not None
    if flash and device.type == "cuda" and base_dtype in ("bf16", "fp16"):
        return "flash_attention_2"
    return "sdpa"


def enable_tf32(device: torch.device | str, on: bool) -> bool:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and later; the LoRA factors and
    whatever stays fp32); returns whether it is on. Nothing changes on other devices."""
    if torch.device(device).type != "cuda":
        return False
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: per backend, never the CPU's
        matmul.fp32_precision = "tf32" if on else "ieee"
        if conv is not None and hasattr(conv, "fp32_precision"):
            conv.fp32_precision = "tf32" if on else "ieee"
    else:
        matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    return on


def make_deterministic(on: bool) -> None:
    """With ``on``, torch's deterministic algorithms (a warning, not an error, for an op that has
    none), cuBLAS' fixed workspace (set before CUDA's first use) and no cuDNN autotuning: a CUDA
    run repeats bitwise. Off, nothing changes (the CPU repeats bitwise already)."""
    if not on:
        return
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
