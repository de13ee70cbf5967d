"""DP-SGD inside a client's local training: opacus on the LoRA injected into the shared base.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (arXiv:1607.00133). Each step
takes a Poisson sample of the client's examples (opacus' ``UniformWithReplacementSampler``:
each example with probability q = expected batch / n), computes every example's gradient of its
own loss (opacus' ``GradSampleModule`` hooks on the trainable ``lora_A`` / ``lora_B`` linears
only; the frozen base gets none), clips each to ``max_grad_norm`` over all trainable factors
together, sums, adds N(0, (noise_multiplier x max_grad_norm)^2) per coordinate and divides by
the expected batch (opacus' ``DPOptimizer`` around the client's ``train.optimizer``). A
logical batch larger than ``train.batch_size`` runs as several micro-batches whose clipped
gradients accumulate before the one noisy step, as opacus' ``BatchMemoryManager`` does it.
The step loop that drives these pieces is :func:`flora.steps.dp_sgd_steps`; what DP-SGD
refuses is :func:`flora.privacy.config.dp_sgd_refusal`.

Opacus rather than a hand-written per-example loop: its hooks fit flora's inject-and-unload
design (they attach to the injected layers and come off with :func:`private_optimizer`'s exit,
the base untouched), and its accountants are the ones the epsilon is read from.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

__all__ = ["DPSGD", "empty_step", "poisson_indices", "private_optimizer"]


@dataclass(frozen=True)
class DPSGD:
    """One client's DP-SGD parameters for a round (flora.privacy.accounting.sample_budget)."""

    noise_multiplier: float
    max_grad_norm: float
    expected_batch: int  # train.batch_size x train.grad_accum: q = expected_batch / n
    reproducible_noise: bool = False  # noise seeded by the round's seed (else a secret seed)


def poisson_indices(num_examples: int, rate: float, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` Poisson samples of range(num_examples), each index with probability ``rate``,
    seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    sampler = UniformWithReplacementSampler(
        num_samples=num_examples, sample_rate=rate, generator=generator, steps=steps
    )
    yield from sampler


def _noise_generator(device: torch.device, seed: int, reproducible: bool) -> torch.Generator:
    generator = torch.Generator(device=device)
    # a secret seed: the server and the other clients know the run's seed, so noise drawn from
    # it could be recomputed and subtracted
    generator.manual_seed(seed if reproducible else secrets.randbits(63))
    return generator


@contextmanager
def private_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    privacy: DPSGD,
    seed: int,
) -> Iterator[DPOptimizer]:
    """``optimizer`` as opacus' DPOptimizer, with per-example gradients hooked into ``model``'s
    trainable layers; on exit the hooks and opacus' parameter attributes come off again.

    Backpropagate the *sum* of the examples' own losses (each the mean over its response
    tokens); the optimizer divides the noisy clipped sum by ``privacy.expected_batch``.
    """
    hooks = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    # this instance's samplers: per-example gradients in fp32 whatever the autocast precision,
    # so each example's norm, its clip factor and the clipped sum are exact to fp32 rounding
    # (in bf16 a clipped example could exceed the bound by ~0.4%: epsilon would be optimistic)
    hooks.GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, torch.nn.Linear: _fp32_linear}
    device = next(p for p in model.parameters() if p.requires_grad).device
    try:
        with warnings.catch_warnings():
            # the first LoRA's input needs no grad (the base is frozen): torch says its full
            # backward hook fires on the output's gradient, which is the one opacus uses
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            yield DPOptimizer(
                optimizer,
                noise_multiplier=privacy.noise_multiplier,
                max_grad_norm=privacy.max_grad_norm,
                expected_batch_size=privacy.expected_batch,
                loss_reduction="mean",
                generator=_noise_generator(device, seed, privacy.reproducible_noise),
            )
    finally:
        hooks.cleanup()


def _fp32_linear(
    layer: torch.nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """opacus' per-example gradients of a linear layer, computed from fp32 activations and
    backprops (under bf16 autocast both arrive in bf16)."""
    from opacus.grad_sample.linear import compute_linear_grad_sample

    return compute_linear_grad_sample(layer, [a.float() for a in activations], backprops.float())


def empty_step(params: Sequence[torch.Tensor]) -> None:
    """Mark an empty Poisson sample: no example's gradient, yet the step still adds its noise
    (the accountant counts every step)."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
