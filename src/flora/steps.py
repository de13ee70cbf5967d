"""A client's local optimizer steps: one loop per mode, each read top to bottom.

- :func:`plain_steps`: forward, backward (fp16: a scaled loss), clip the gradients together to
  ``train.max_grad_norm``, step ``train.optimizer``, step the schedule, zero the gradients.
- :func:`dp_sgd_steps`: DP-SGD (Abadi et al., 2016, arXiv:1607.00133) through opacus, as
  :mod:`flora.privacy.dp_sgd` wraps it: forward, backward of the examples' summed losses, then
  the private step clips every example's gradient, adds the noise, divides by the expected
  batch and steps ``train.optimizer``. Poisson samples and per-example losses always; what it
  refuses is :func:`flora.privacy.config.dp_sgd_refusal`.

Both run on a model whose trainable parameters are ``params`` (the injected LoRA factors) and
return (each step's loss, the non-pad tokens fed through the model). A step's loss is logged
as its ``train.loss_weighting`` says: the mean over its response tokens ("tokens"), or the mean
of each example's own mean ("examples").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from flora.config import TrainConfig
from flora.data.batching import batches, collate, pack
from flora.data.prompts import Example
from flora.devices import autocast_context, grad_scaler
from flora.errors import FloraError
from flora.loss import (
    POSITIONS,
    response_loss,
    response_losses,
    response_positions,
    supervised_tokens,
)
from flora.optim import make_optimizer, make_scheduler

if TYPE_CHECKING:
    from flora.privacy.dp_sgd import DPSGD

__all__ = ["dp_sgd_steps", "local_steps", "plain_steps", "windows"]

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels: each (B, T)


def local_steps(
    model: PreTrainedModel,
    examples: Sequence[Example],
    params: list[torch.Tensor],
    config: TrainConfig,
    seed: int,
    pad_id: int,
    total: int,
    progress: bool = False,
    privacy: DPSGD | None = None,
) -> tuple[list[float], int]:
    """A client's ``total`` steps: :func:`dp_sgd_steps` with ``privacy``, else
    :func:`plain_steps`; returns (per-step loss, tokens seen)."""
    if total == 0:
        return [], 0
    if privacy is None:
        return plain_steps(model, examples, params, config, seed, pad_id, total, progress)
    return dp_sgd_steps(model, examples, params, config, privacy, seed, pad_id, total, progress)


def plain_steps(
    model: PreTrainedModel,
    examples: Sequence[Example],
    params: list[torch.Tensor],
    config: TrainConfig,
    seed: int,
    pad_id: int,
    total: int,
    progress: bool = False,
) -> tuple[list[float], int]:
    """``total`` steps of ``train.optimizer`` under ``train.schedule``, each over
    ``train.grad_accum`` micro-batches (or a Poisson sample) with one global gradient clip."""
    sampling, weighting = config.resolved(private=False)
    optimizer = make_optimizer(params, config)
    scheduler = make_scheduler(optimizer, config, total)
    device = next(model.parameters()).device
    scaler = grad_scaler(config.precision, device.type)  # fp16: scaled loss, skipped inf steps
    curve: list[torch.Tensor | float] = []
    tokens = 0
    model.train()
    bar = tqdm(total=total, disable=not progress, desc="local steps", leave=False)
    for window, divisor in windows(examples, config, seed, total, sampling):
        logged: torch.Tensor | float = 0.0
        count = 0
        micro = _collated(window, pad_id, skip_empty=weighting == "tokens", packing=config.packing)
        for batch, share, size in micro:
            tokens += size
            loss, part, n = _micro_loss(model, batch, config.precision, weighting, share, divisor)
            scaler.scale(loss).backward()
            logged, count = logged + part, count + n
        if sampling == "poisson":  # an empty sample still steps, as DP-SGD's does
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        if config.max_grad_norm > 0:
            scaler.unscale_(optimizer)  # clip the true gradients (a no-op unless fp16)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(logged / max(1, count))
        _show(bar, curve, progress)
    bar.close()
    return read_curve(curve), tokens


def dp_sgd_steps(
    model: PreTrainedModel,
    examples: Sequence[Example],
    params: list[torch.Tensor],
    config: TrainConfig,
    privacy: DPSGD,
    seed: int,
    pad_id: int,
    total: int,
    progress: bool = False,
) -> tuple[list[float], int]:
    """``total`` DP-SGD steps, each on a Poisson sample of ``examples`` cut into micro-batches
    of at most ``train.batch_size``, whose clipped per-example gradients add up before the one
    noisy step (opacus' ``BatchMemoryManager`` does it so). ``config`` passes
    :func:`~flora.privacy.config.dp_sgd_refusal`: no fp16, so no gradient scaler."""
    from flora.privacy.dp_sgd import empty_step, private_optimizer  # opacus: imported here

    optimizer = make_optimizer(params, config)
    scheduler = make_scheduler(optimizer, config, total)
    curve: list[torch.Tensor | float] = []
    tokens = 0
    model.train()
    bar = tqdm(total=total, disable=not progress, desc="local steps", leave=False)
    with private_optimizer(model, optimizer, privacy, seed + 2) as dp:
        for window, _ in windows(examples, config, seed, total, "poisson"):
            micro = list(_collated(window, pad_id, skip_empty=False))
            logged: torch.Tensor | float = 0.0
            count = 0
            for i, (batch, _, size) in enumerate(micro):
                tokens += size
                # the sum of the examples' own means: opacus clips each example's gradient,
                # and the optimizer divides the noisy sum by the expected batch
                loss, part, n = _micro_loss(model, batch, config.precision, "examples", divisor=1)
                loss.backward()
                logged, count = logged + part, count + n
                if i < len(micro) - 1:
                    dp.signal_skip_step(True)  # clip and keep this micro-batch's gradients
                    dp.step()
                    dp.zero_grad(set_to_none=True)
            if not micro:
                empty_step(params)  # an empty sample: no gradient, the noise all the same
            dp.step()  # clip, add the noise, divide by the expected batch, train.optimizer
            scheduler.step()
            dp.zero_grad(set_to_none=True)
            curve.append(logged / max(1, count))
            _show(bar, curve, progress)
    bar.close()
    return read_curve(curve), tokens


# ---------------------------------------------------------------------------------------------
# what both loops share: the steps' examples and a micro-batch's loss


def windows(
    examples: Sequence[Example], config: TrainConfig, seed: int, total: int, sampling: str
) -> Iterator[tuple[list[list[Example]], int]]:
    """Each step's micro-batches, and the number its examples' losses are divided by.

    "shuffle": ``grad_accum`` micro-batches of the epoch's shuffle (the divisor: the examples
    in them). "poisson": every example with probability q = batch_size x grad_accum / n, as
    DP-SGD's accountant assumes, cut into micro-batches of at most batch_size (the divisor: the
    expected batch, so the mean stays unbiased; a sample may be empty)."""
    if sampling == "poisson":
        from flora.privacy.dp_sgd import poisson_indices  # opacus: imported where it is used

        expected = config.batch_size * config.grad_accum
        if expected > len(examples):
            raise FloraError(
                f"train.sampling = 'poisson' needs a batch (train.batch_size x train.grad_accum "
                f"= {expected}) no larger than the client's {len(examples)} examples; lower them"
            )
        size = config.batch_size
        for indices in poisson_indices(len(examples), expected / len(examples), total, seed + 1):
            picked = [examples[i] for i in indices]
            yield [picked[i : i + size] for i in range(0, len(picked), size)], expected
        return
    stream = _micro_batches(examples, config, seed)
    for _ in range(total):
        window = list(islice(stream, config.grad_accum))
        yield window, sum(len(b) for b in window)


def _micro_batches(
    examples: Sequence[Example], config: TrainConfig, seed: int
) -> Iterator[list[Example]]:
    """``config``'s number of micro-batches, reshuffled each epoch by (seed, epoch)."""
    remaining, epoch = config._micro_batches(len(examples)), 0
    lengths = [len(e["input_ids"]) for e in examples] if config.group_by_length else None
    while remaining > 0:
        for batch in batches(examples, config.batch_size, seed, epoch, lengths):
            if remaining == 0:
                return
            remaining -= 1
            yield batch
        epoch += 1


def _collated(
    window: list[list[Example]], pad_id: int, *, skip_empty: bool, packing: bool = False
) -> Iterator[tuple[Batch, float, int]]:
    """A step's micro-batches, collated on the host, each with its share of the step's response
    tokens and its non-pad tokens; ``skip_empty`` passes over those without any response token
    (their mean loss would be 0/0). Each batch carries its response positions, so the device
    never computes a shape from data (flora.loss.POSITIONS). ``packing``: each micro-batch is
    one packed row (flora.data.batching.pack), its tokens all real."""
    collated = [pack(b) if packing else collate(b, pad_id) for b in window]
    supervised = sum(supervised_tokens(batch["labels"]) for batch in collated)
    for batch in collated:
        share = supervised_tokens(batch["labels"]) / max(1, supervised)
        if skip_empty and share == 0:
            continue
        batch[POSITIONS] = response_positions(batch["labels"])
        mask = batch.get("attention_mask")
        yield batch, share, int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on ``device``: on CUDA through pinned memory, without waiting for the copy."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def read_curve(curve: Sequence[torch.Tensor | float]) -> list[float]:
    """The steps' losses as floats: the round's one read of the device (one sync)."""
    tensors = [v for v in curve if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in curve]
    device, dtype = tensors[0].device, tensors[0].dtype
    values = [
        v.to(dtype) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype, device=device)
        for v in curve
    ]
    return [float(v) for v in torch.stack(values).cpu().tolist()]


def _logged(value: torch.Tensor) -> torch.Tensor:
    """A loss kept for the log on its device, in float64 (as Python's floats add), float32 on
    MPS (which has no float64)."""
    value = value.detach()
    return value.float() if value.device.type == "mps" else value.double()


def _show(bar: tqdm, curve: Sequence[torch.Tensor | float], progress: bool) -> None:
    """Advance the progress bar; its loss is read (a sync per step) only where it is shown."""
    bar.update(1)
    if progress:
        bar.set_postfix(loss=f"{float(curve[-1]):.4f}")


def _micro_loss(
    model: PreTrainedModel,
    batch: Batch,
    precision: str,
    weighting: str,
    share: float = 1.0,
    divisor: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One micro-batch's part of its step's loss: (what to backpropagate, the loss it adds to
    the step's log (on the device: read once a round), the examples that log is averaged over).

    "tokens": the mean over its response tokens x ``share``, its share of the step's response
    tokens (a part of the step's mean already: it counts no examples). "examples": the sum of
    its examples' own means over ``divisor``, counting its examples."""
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    if weighting == "tokens":
        with autocast_context(precision, device.type):
            loss = response_loss(model, batch)  # () mean over response tokens
        return loss * share, _logged(loss) * share, 0
    with autocast_context(precision, device.type):
        losses = response_losses(model, batch)  # (B,) each example's own mean
    return losses.sum() / divisor, _logged(losses.sum()), len(losses)
