"""A client's optimiser and learning-rate schedule, each chosen by name from a small table.

``train.optimizer`` and ``train.schedule`` name an entry here, as torchtune's recipes name a
component their ``config.instantiate`` builds, but as a plain dict: a new optimiser or schedule
is one entry, never an ``if`` in the training loop. The names are importable without torch
(``flora.config`` validates them); torch is imported inside the factories.

The schedule: a linear warmup over ceil(warmup_ratio x total) steps, then the named decay of the
learning rate over the remaining steps (LambdaLR's factor on ``train.lr``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class TrainConfig(Protocol):
    """What the factories read of a ``flora.config.TrainConfig`` (typed here: the config
    imports this module's tables to validate its names)."""

    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    warmup_ratio: float


__all__ = ["OPTIMIZERS", "SCHEDULES", "lr_factor", "make_optimizer", "make_scheduler"]


def _adamw(params: Sequence[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _adamw_fused(params: Sequence[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    import torch

    # one kernel for all parameters (CUDA, CPU, MPS): the same update as "adamw" up to the
    # rounding of its fused arithmetic
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def _sgd(params: Sequence[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    import torch

    # plain SGD, DP-SGD's textbook optimiser; weight_decay is an L2 term added to the gradient
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)


# train.optimizer -> a factory of the optimiser over the trainable LoRA parameters
OPTIMIZERS: dict[str, Callable[[Sequence[torch.Tensor], TrainConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw-fused": _adamw_fused,
    "sgd": _sgd,
}

# train.schedule -> the lr factor after warmup, at progress in [0, 1) through the decay steps
SCHEDULES: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "constant": lambda progress: 1.0,
}


def make_optimizer(params: Sequence[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``params`` at ``config.lr`` and ``config.weight_decay``."""
    return OPTIMIZERS[config.optimizer](params, config)


def lr_factor(total: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
    """The lr factor of each of ``total`` steps: linear warmup over ceil(warmup_ratio x total)
    steps, then ``schedule``'s decay."""
    warmup = math.ceil(warmup_ratio * total)
    decay = SCHEDULES[schedule]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return decay((step - warmup) / max(1, total - warmup))  # in [0, 1): no step gets lr 0

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``config.schedule`` after ``config.warmup_ratio``'s warmup, over ``total`` steps."""
    import torch

    factor = lr_factor(total, config.warmup_ratio, config.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
