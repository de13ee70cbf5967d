"""The downlink's number formats: rounding onto a grid, encoding losslessly from it, and the
round update's codec carrying each format through safetensors and Flower's numpy arrays."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from flora.factors import LoraFactors
from flora.protocol import RoundUpdate
from flora.wire import FORMATS, decode, encode, format_of, on_grid

SIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def factors(seed: int = 0, rank: int = 3, out: int = 7, inp: int = 5) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, inp, generator=g) * torch.logspace(-3, 2, rank)[:, None]
    B = torch.randn(out, rank, generator=g)
    B[:, -1] = 0  # a component with an all-zero column
    return LoraFactors(A, B, 1.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_values_on_a_grid_encode_and_decode_bitwise(fmt):
    grid = on_grid(factors(), fmt)
    parts = encode(grid, fmt)
    assert format_of(parts["A"]) == fmt and parts["A"].element_size() == SIZE[fmt]
    back = decode(parts)
    assert torch.equal(back.A, grid.A) and torch.equal(back.B, grid.B)
    # and the grid is a fixed point: rounding it again changes nothing
    again = on_grid(grid, fmt)
    assert torch.equal(again.A, grid.A) and torch.equal(again.B, grid.B)


@pytest.mark.parametrize(("fmt", "tolerance"), [("fp16", 1e-3), ("bf16", 8e-3), ("int8", 8e-3)])
def test_rounding_is_relative_to_each_component(fmt, tolerance):
    f = factors(1)
    grid = on_grid(f, fmt)
    # per row of A (magnitudes 1e-3 .. 1e2): each within its own relative error
    error = (grid.A - f.A).abs().amax(dim=1) / f.A.abs().amax(dim=1)
    assert float(error.max()) <= tolerance
    assert not grid.B[:, -1].any()  # an all-zero component stays zero


def test_int8_uses_every_value_it_can_and_power_of_two_scales():
    f = factors(2)
    parts = encode(on_grid(f, "int8"), "int8")
    q = parts["A"].int()
    assert int(q.abs().max()) <= 127
    assert bool((q.abs().amax(dim=1) >= 64).all())  # the least power of two: at least 64 used
    assert parts["A_exp"].dtype == torch.int8 and parts["A_exp"].shape == (3,)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_round_update_keeps_its_format_through_files_and_bytes(fmt):
    update = RoundUpdate(
        4, {"m": on_grid(factors(3), fmt), "n": on_grid(factors(4), fmt)}, wire=fmt
    )
    tensors = update.to_tensors("0/")
    back = RoundUpdate.from_tensors(load(save(tensors)), 4, "0/")  # safetensors' bytes
    assert back.wire == fmt and back.round == 4
    for m in ("m", "n"):
        assert torch.equal(back.factors[m].A, update.factors[m].A)
        assert torch.equal(back.factors[m].B, update.factors[m].B)
    assert back.nbytes() == update.nbytes() == sum(t.nbytes for t in tensors.values())
    elements = sum(f.A.numel() + f.B.numel() for f in update.factors.values())
    exponents = 2 * 3 * 2 if fmt == "int8" else 0  # one per component, of A and B, per module
    assert update.nbytes() == elements * SIZE[fmt] + exponents


def test_every_format_travels_through_numpy():
    # Flower's arrays are numpy arrays: numpy has no bf16, so bf16 travels as int16 bits
    for fmt in FORMATS:
        tensors = RoundUpdate(1, {"m": on_grid(factors(), fmt)}, wire=fmt).to_tensors()
        through = {k: torch.from_numpy(v.numpy().copy()) for k, v in tensors.items()}
        back = RoundUpdate.from_tensors(through, 1)
        assert back.wire == fmt
        assert torch.equal(back.factors["m"].A, on_grid(factors(), fmt).A)
