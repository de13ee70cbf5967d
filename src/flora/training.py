"""One client's local LoRA training on a base model it leaves as found, and held-out loss.

The simulator keeps a single base model for all K clients. :func:`train_client` injects the
client's LoRA into it in place (peft's ``LoraModel`` tuner, no copy), trains only the LoRA
factors, copies them out, and unloads the LoRA layers again without merging, so the base weights
are bitwise what they were before and the next client starts from the same model.

LoRA: Hu et al., 2021 (https://arxiv.org/abs/2106.09685); rsLoRA scaling alpha / sqrt(r):
Kalajdzievski, 2023 (https://arxiv.org/abs/2312.03732); frozen A (FFA-LoRA): Sun et al., 2024
(https://arxiv.org/abs/2403.12313).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, LoraModel
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from flora.adapters import Adapter, LoraFactors, lora_scaling
from flora.config import TrainConfig
from flora.data.batching import batches, collate
from flora.data.prompts import IGNORE_INDEX, Example
from flora.devices import autocast_context, grad_scaler
from flora.errors import FloraError
from flora.loss import response_loss, response_losses
from flora.memory import peak_memory
from flora.weights import fan_in_fan_out

if TYPE_CHECKING:
    from flora.privacy.dp_sgd import DPSGD

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LocalResult",
    "TrainConfig",
    "category_losses",
    "evaluate_loss",
    "train_client",
]

DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
_ADAPTER_NAME = "flora"


@dataclass
class LocalResult:
    """What one client's local training returns."""

    factors: Adapter  # module -> A (r, in), B (out, r): detached fp32 CPU clones
    examples: int  # examples the client holds (its aggregation weight)
    tokens: int  # non-pad tokens fed through the model
    train_loss: float  # mean of loss_curve; nan when no step ran
    seconds: float
    steps: int  # optimizer steps taken
    loss_curve: list[float] = field(default_factory=list)  # per step, token-weighted
    peak_rss_mib: float | None = None  # highest resident set size while training (Linux)
    peak_cuda_mib: float | None = None  # peak allocated CUDA memory while training


# ---------------------------------------------------------------------------------------------
# LoRA in and out of the shared model


@contextmanager
def _lora_injected(model: PreTrainedModel, config: LoraConfig) -> Iterator[dict[str, LoraLayer]]:
    """Inject a LoRA in place; on exit unload it without merging and restore requires_grad."""
    if getattr(model, "peft_config", None) is not None or _lora_layers(model):
        raise FloraError("the base model already holds LoRA layers; unload them before training")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    tuner = LoraModel(model, config, _ADAPTER_NAME)  # mutates model in place, freezes the base
    try:
        yield _lora_layers(model)
    finally:
        tuner.unload()  # swaps every LoRA layer back for its base layer, deletes peft_config
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, param.requires_grad))
        model.train(was_training)


@contextmanager
def _checkpointing(model: PreTrainedModel, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing for the block (non-reentrant: works with a frozen base whose
    inputs need no grad); the shared model is left as found."""
    if not enabled:
        yield
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()


def _lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _weights(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The injected lora_A (r, in) and lora_B (out, r) weight parameters of one layer."""
    a = layer.lora_A[_ADAPTER_NAME].weight
    b = layer.lora_B[_ADAPTER_NAME].weight
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return a, b


def _load_init(layers: dict[str, LoraLayer], init: Adapter, rank: int, scaling: float) -> None:
    """Copy ``init`` into the injected layers, re-expressed at the client's ``scaling``."""
    if set(init) != set(layers):
        missing, extra = sorted(set(layers) - set(init)), sorted(set(init) - set(layers))
        raise FloraError(
            f"init adapter modules do not match the LoRA targets: missing {missing[:3]}, "
            f"unexpected {extra[:3]}; pass an init over exactly the target modules"
        )
    for name, layer in layers.items():
        a, b = _weights(layer)
        factors = init[name].with_scaling(scaling)
        if factors.A.shape != a.shape or factors.B.shape != b.shape:
            raise FloraError(
                f"init module '{name}' has A {tuple(factors.A.shape)}, B "
                f"{tuple(factors.B.shape)}; rank {rank} needs A {tuple(a.shape)}, B "
                f"{tuple(b.shape)}: give an init of rank {rank}"
            )
        with torch.no_grad():
            a.copy_(factors.A)
            b.copy_(factors.B)


def _extract(layers: dict[str, LoraLayer]) -> Adapter:
    adapter: Adapter = {}
    for name, layer in sorted(layers.items()):
        a, b = _weights(layer)
        adapter[name] = LoraFactors(
            A=a.detach().float().cpu().clone(),  # (r, in)
            B=b.detach().float().cpu().clone(),  # (out, r)
            scaling=float(layer.scaling[_ADAPTER_NAME]),
        )
    return adapter


# ---------------------------------------------------------------------------------------------
# the training loop


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


def _windows(
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


def _lr_lambda(total: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
    """Linear warmup over ceil(warmup_ratio * total) steps, then linear or cosine decay."""
    warmup = math.ceil(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)  # in [0, 1): no step gets lr 0
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def _supervised(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss counts: labels after the one-token shift that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def train_client(
    model: PreTrainedModel,
    examples: Sequence[Example],
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    config: TrainConfig,
    seed: int,
    pad_id: int,
    init: Adapter | None = None,
    freeze_A: bool = False,
    use_rslora: bool = False,
    progress: bool = False,
    privacy: DPSGD | None = None,
) -> LocalResult:
    """Train a rank-``rank`` LoRA on ``examples``; return its factors and leave the model as found.

    The LoRA starts from ``init`` (re-expressed at this client's scaling) or from PEFT's seeded
    init (A Kaiming-uniform, B zero). With ``freeze_A`` only B trains. Everything random (init,
    dropout, data order) derives from ``seed``, so equal calls give bitwise-equal factors.
    With ``privacy`` every step is DP-SGD (flora.privacy.dp_sgd): Poisson batches, each
    example's gradient clipped, Gaussian noise on their sum; its noise is seeded by ``seed``
    only with ``privacy.reproducible_noise``.
    """
    if not examples:
        raise FloraError("train_client got no examples; give each client at least one example")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise FloraError(f"lora rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise FloraError(f"lora alpha must be > 0, got {alpha!r}")
    if not target_modules:
        raise FloraError("target_modules is empty; name the linear layers to adapt, e.g. q_proj")
    scaling = lora_scaling(alpha, rank, use_rslora)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int, any number works
        target_modules=list(target_modules),
        lora_dropout=config.lora_dropout,
        use_rslora=use_rslora,
        bias="none",
        fan_in_fan_out=fan_in_fan_out(model, target_modules),  # GPT-2's Conv1D: weight (in, out)
    )
    total = config.total_steps(len(examples))
    if privacy is not None and config.gradient_checkpointing:
        raise FloraError(
            "privacy.mode = 'dp-sgd' with train.gradient_checkpointing: opacus' per-example "
            "hooks would see each layer's recomputed forward twice; set "
            "train.gradient_checkpointing = false"
        )
    if privacy is not None and config.precision == "fp16":
        raise FloraError(
            "privacy.mode = 'dp-sgd' does not train in fp16 (the gradient scaler's loss scale "
            "would be clipped with the gradients); set train.precision = 'bf16' or 'fp32'"
        )
    if config.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", 0):
        raise FloraError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support it; set "
            "train.gradient_checkpointing = false"
        )
    start = time.perf_counter()
    with (
        torch.random.fork_rng(devices=[]),
        peak_memory() as memory,
        _checkpointing(model, config.gradient_checkpointing),
    ):
        torch.manual_seed(seed)
        with _lora_injected(model, lora_config) as layers:
            if init is not None:
                _load_init(layers, init, rank, scaling)
            if freeze_A:
                for layer in layers.values():
                    _weights(layer)[0].requires_grad_(False)
            params = [p for layer in layers.values() for p in _weights(layer) if p.requires_grad]
            curve, tokens = _run_steps(
                model, examples, params, config, seed, pad_id, total, progress, privacy
            )
            factors = _extract(layers)
    return LocalResult(
        factors=factors,
        examples=len(examples),
        tokens=tokens,
        train_loss=sum(curve) / len(curve) if curve else math.nan,
        seconds=time.perf_counter() - start,
        steps=len(curve),
        loss_curve=curve,
        peak_rss_mib=memory.rss_mib,
        peak_cuda_mib=memory.cuda_mib,
    )


def _run_steps(
    model: PreTrainedModel,
    examples: Sequence[Example],
    params: list[torch.Tensor],
    config: TrainConfig,
    seed: int,
    pad_id: int,
    total: int,
    progress: bool,
    privacy: DPSGD | None = None,
) -> tuple[list[float], int]:
    """AdamW + warmup/decay + clipping + accumulation, or DP-SGD's clipped noisy steps; returns
    (per-step loss, tokens seen)."""
    if total == 0:
        return [], 0
    sampling, weighting = config.resolved(private=privacy is not None)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    factor = _lr_lambda(total, config.warmup_ratio, config.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    device = next(model.parameters()).device
    scaler = grad_scaler(config.precision, device.type)  # fp16: scaled loss, skipped inf steps
    curve: list[float] = []
    tokens = 0
    model.train()
    bar = tqdm(total=total, disable=not progress, desc="local steps", leave=False)
    with ExitStack() as stack:
        dp = None
        if privacy is not None:
            from flora.privacy.dp_sgd import empty_step, private_optimizer

            dp = stack.enter_context(private_optimizer(model, optimizer, privacy, seed + 2))
        for window, divisor in _windows(examples, config, seed, total, sampling):
            batches_ = [collate(b, pad_id) for b in window]
            supervised = sum(_supervised(batch["labels"]) for batch in batches_)
            step_loss, summed, count = 0.0, 0.0, 0
            for i, batch in enumerate(batches_):
                weight = _supervised(batch["labels"]) / max(1, supervised)
                if weighting == "tokens" and weight == 0:
                    continue  # no response token: the model's mean loss would be 0/0
                tokens += int(batch["attention_mask"].sum())
                batch = {k: v.to(device) for k, v in batch.items()}
                if weighting == "tokens":
                    with autocast_context(config.precision, device.type):
                        loss = response_loss(model, batch)  # mean over response tokens
                    scaler.scale(loss * weight).backward()
                    step_loss += float(loss.detach()) * weight
                    continue
                with autocast_context(config.precision, device.type):
                    losses = response_losses(model, batch)  # each example's own mean
                # DP-SGD: the sum (each example's gradient is clipped, the optimizer divides)
                scaler.scale(losses.sum() / (1 if dp else divisor)).backward()
                summed, count = summed + float(losses.detach().sum()), count + len(losses)
                if dp is not None and i < len(batches_) - 1:
                    dp.signal_skip_step(True)  # clip and keep this micro-batch's gradients
                    dp.step()
                    dp.zero_grad(set_to_none=True)
            if weighting == "examples":
                step_loss = summed / max(1, count)
            if dp is not None:
                if not batches_:
                    empty_step(params)
                dp.step()  # clip, add the noise, divide by the expected batch, AdamW
            else:
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
            (dp or optimizer).zero_grad(set_to_none=True)
            curve.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
    bar.close()
    return curve, tokens


# ---------------------------------------------------------------------------------------------
# held-out loss


def evaluate_loss(
    model: PreTrainedModel,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    precision: str = "fp32",
) -> float:
    """Token-weighted mean cross-entropy over response tokens (labels != -100), in eval mode."""
    if not examples:
        raise FloraError("evaluate_loss got no examples; give a non-empty held-out set")
    if batch_size < 1:
        raise FloraError(f"eval batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start : start + batch_size], pad_id)
                n = _supervised(batch["labels"])
                if n == 0:
                    continue
                with autocast_context(precision, device.type):
                    inputs = {k: v.to(device) for k, v in batch.items()}
                    loss = response_loss(model, inputs)
                total += float(loss) * n  # mean * count = this batch's summed loss
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise FloraError("evaluate_loss: no example has a response token; check the labels")
    return total / count


def category_losses(
    model: PreTrainedModel,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    precision: str = "fp32",
) -> tuple[float, dict[str, tuple[float, int, int]]]:
    """:func:`evaluate_loss` per ``category`` (each batched on its own, one pass over the
    examples): the overall token-weighted loss, and per category (loss, examples, tokens)."""
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example["category"], []).append(example)
    per_category: dict[str, tuple[float, int, int]] = {}
    total, count = 0.0, 0
    for category in sorted(groups):
        members = groups[category]
        tokens = sum(label != IGNORE_INDEX for e in members for label in e["labels"][1:])
        if tokens == 0:
            continue
        loss = evaluate_loss(
            model, members, batch_size=batch_size, pad_id=pad_id, precision=precision
        )
        per_category[category] = (loss, len(members), tokens)
        total, count = total + loss * tokens, count + tokens
    if count == 0:
        raise FloraError("held-out set: no example has a response token; raise data.max_length")
    return total / count, per_category
