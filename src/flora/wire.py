"""The number formats a merged update's factors may travel in: fp32, fp16, bf16 and int8.

A lossy downlink (flora-warm's ``downlink`` option) rounds the factors it sends onto a format's
grid *before* anyone merges them: the server keeps the rounded values in fp32 (its history, its
checkpoints), every client decodes the same fp32 values from the wire, so every holder merges the
same numbers bitwise; what the rounding lost stays with the server (flora-warm carries it).

- fp16, bf16: each value rounded to the half format (2 bytes). bf16 travels as its raw bits in
  an int16 tensor, since Flower's arrays go through numpy, which has no bf16.
- int8: per component (a row of A, a column of B) a power-of-two scale 2^e and values
  q in [-127, 127] (1 byte each, plus one int8 exponent per row of A and column of B). A
  power of two makes q 2^e exact in fp32 and lets the encoder recover (q, e) from the rounded
  values alone: e is the least with max |x| <= 127 2^e, so the largest |q| is at least 64 and
  re-deriving e from q 2^e gives e again.

Every format is self-describing on the wire (float32, float16, int16 = bf16 bits, int8 with
exponents), so a decoder needs no side channel. Pure torch.
"""

from __future__ import annotations

import torch

from flora.factors import LoraFactors

__all__ = ["FORMATS", "decode", "encode", "format_of", "nbytes", "on_grid"]

FORMATS = ("fp32", "fp16", "bf16", "int8")
_EXP_MIN, _EXP_MAX = -126, 127  # int8 exponents; 2^e stays a normal fp32 number
_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def nbytes(factors: LoraFactors, fmt: str) -> int:
    """The bytes :func:`encode` gives ``factors`` at ``fmt``, without encoding them: every
    element at the format's size, and for int8 one exponent per component of A and of B."""
    elements = factors.A.numel() + factors.B.numel()
    return elements * _SIZE[fmt] + (2 * factors.rank if fmt == "int8" else 0)


def _exponents(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per slice along ``dim`` (1: rows, 0: columns) the least e with max |x| <= 127 2^e."""
    top = x.abs().amax(dim=dim).double()
    e = torch.ceil(torch.log2(top.clamp_min(1e-300) / 127))
    e = e + (top > 127 * torch.exp2(e)).double()  # a log2 rounded low
    e = e - (top <= 127 * torch.exp2(e - 1)).double()  # ... or high
    e = torch.where(top > 0, e, torch.zeros_like(e))
    return e.clamp(_EXP_MIN, _EXP_MAX).to(torch.int8)


def _scale(e: torch.Tensor, dim: int) -> torch.Tensor:
    scale = torch.exp2(e.float())
    return scale[:, None] if dim == 1 else scale[None, :]


def _int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    e = _exponents(x, dim)
    q = torch.round(x.float() / _scale(e, dim)).clamp(-127, 127).to(torch.int8)
    return q, e


def _round(x: torch.Tensor, fmt: str, dim: int) -> torch.Tensor:
    """``x`` rounded to ``fmt``'s grid, in fp32."""
    if fmt == "fp32":
        return x.float()
    if fmt == "fp16":
        return x.half().float()
    if fmt == "bf16":
        return x.bfloat16().float()
    q, e = _int8(x, dim)
    return q.float() * _scale(e, dim)


def on_grid(factors: LoraFactors, fmt: str) -> LoraFactors:
    """``factors`` (scaling 1) rounded to ``fmt``: fp32 values the format holds exactly."""
    return LoraFactors(
        _round(factors.A, fmt, 1).contiguous(), _round(factors.B, fmt, 0).contiguous(), 1.0
    )


def encode(factors: LoraFactors, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors ``factors`` (on ``fmt``'s grid, see :func:`on_grid`) travel as: "A", "B" and,
    for int8, "A_exp" (r,) and "B_exp" (r,)."""
    A, B = factors.A.float(), factors.B.float()
    if fmt == "fp32":
        return {"A": A, "B": B}
    if fmt == "fp16":
        return {"A": A.half(), "B": B.half()}
    if fmt == "bf16":
        return {"A": A.bfloat16().view(torch.int16), "B": B.bfloat16().view(torch.int16)}
    if fmt != "int8":
        raise ValueError(f"unknown wire format {fmt!r}; one of {FORMATS}")
    qA, eA = _int8(A, 1)
    qB, eB = _int8(B, 0)
    return {"A": qA, "B": qB, "A_exp": eA, "B_exp": eB}


def format_of(A: torch.Tensor) -> str:
    """The format a factor tensor on the wire is in (its dtype says)."""
    return {torch.float16: "fp16", torch.int16: "bf16", torch.int8: "int8"}.get(A.dtype, "fp32")


def decode(parts: dict[str, torch.Tensor]) -> LoraFactors:
    """The fp32 factors (scaling 1) :func:`encode` wrote, bitwise the values that were encoded."""
    A, B = parts["A"], parts["B"]
    fmt = format_of(A)
    if fmt == "bf16":
        return LoraFactors(A.view(torch.bfloat16).float(), B.view(torch.bfloat16).float(), 1.0)
    if fmt == "int8":
        A = A.float() * _scale(parts["A_exp"], 1)
        B = B.float() * _scale(parts["B_exp"], 0)
        return LoraFactors(A, B, 1.0)
    return LoraFactors(A.float(), B.float(), 1.0)
