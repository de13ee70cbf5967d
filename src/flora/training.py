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
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, LoraModel
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from flora.aggregation.lifecycle import CORE
from flora.config import TrainConfig
from flora.data.batching import collate
from flora.data.prompts import IGNORE_INDEX, Example
from flora.devices import autocast_context
from flora.errors import FloraError
from flora.factors import Adapter, LoraFactors, lora_scaling
from flora.loss import POSITIONS, response_loss, response_positions, supervised_tokens
from flora.memory import peak_memory
from flora.privacy.config import dp_sgd_refusal
from flora.steps import local_steps, to_device
from flora.weights import applied, fan_in_fan_out

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
    """The injected lora_A (r, in) and lora_B (out, r) weight parameters of one layer (with a
    core, lora_A's frame A)."""
    a = layer.lora_A[_ADAPTER_NAME].weight
    b = layer.lora_B[_ADAPTER_NAME].weight
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return a, b


class _Cored(torch.nn.Sequential):
    """lora_A as its frozen frame A (r, in) then a trainable r x r core R: x -> R (A x), so the
    layer's LoRA is B R A (LoRA-SB). Two plain linears: opacus' per-example hooks fit the core.
    ``weight`` is the frame's, which PEFT reads for the input's dtype."""

    @property
    def weight(self) -> torch.Tensor:
        frame = self[0]
        assert isinstance(frame, torch.nn.Linear)
        return frame.weight

    @property
    def core(self) -> torch.Tensor:
        core = self[1]
        assert isinstance(core, torch.nn.Linear)
        return core.weight


def _insert_cores(layers: dict[str, LoraLayer], core: dict[str, torch.Tensor], rank: int) -> None:
    """Put an r x r core, started from ``core``, after every layer's lora_A."""
    if set(core) != set(layers):
        missing = sorted(set(layers) - set(core))[:3]
        raise FloraError(f"the task's cores do not match the LoRA targets (missing {missing})")
    for name, layer in layers.items():
        frame = layer.lora_A[_ADAPTER_NAME]
        assert isinstance(frame, torch.nn.Linear)
        if tuple(core[name].shape) != (rank, rank):
            raise FloraError(
                f"core of '{name}' is {tuple(core[name].shape)}; rank {rank} needs ({rank}, {rank})"
            )
        w = frame.weight
        R = torch.nn.Linear(rank, rank, bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            R.weight.copy_(core[name])
        layer.lora_A[_ADAPTER_NAME] = _Cored(frame, R)


def _cores(layer: LoraLayer) -> list[torch.Tensor]:
    a = layer.lora_A[_ADAPTER_NAME]
    return [a.core] if isinstance(a, _Cored) else []


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
        for core in _cores(layer):  # B (R A): send A as R A
            a = core.detach().float() @ a.detach().float()
        adapter[name] = LoraFactors(
            A=a.detach().float().cpu().clone(),  # (r, in)
            B=b.detach().float().cpu().clone(),  # (out, r)
            scaling=float(layer.scaling[_ADAPTER_NAME]),
        )
    return adapter


# ---------------------------------------------------------------------------------------------
# one client's local training


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
    trains: Collection[str] = ("A", "B"),
    fold_init: bool = False,
    folded: Adapter | None = None,
    core: dict[str, torch.Tensor] | None = None,
    use_rslora: bool = False,
    progress: bool = False,
    privacy: DPSGD | None = None,
) -> LocalResult:
    """Train a rank-``rank`` LoRA on ``examples``; return its factors and leave the model as found.

    The LoRA starts from ``init`` (re-expressed at this client's scaling) or from PEFT's seeded
    init (A Kaiming-uniform, B zero). Only the parts in ``trains`` ("A", "B") train; the others
    stay as they started. With ``fold_init`` the init is part of the model already: training
    runs over the base minus init's B @ A (restored bitwise after), so the client starts from
    exactly the model it was given (a warm start); ``folded`` (scaling 1) is added to the base
    while it trains (global parts the LoRA does not hold: Fed-PLoRA's untrained components).
    With ``trains`` = {"R"} only an r x r core between the init's frozen A and B trains, started
    from ``core`` (LoRA-SB); the factors returned are then A = R A_init and B as sent.
    Everything random (init, dropout, data order)
    derives from ``seed``, so equal calls give bitwise-equal factors.
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
    refusal = dp_sgd_refusal(config) if privacy is not None else None
    if refusal is not None:
        raise FloraError(refusal)
    if config.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", 0):
        raise FloraError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support it; set "
            "train.gradient_checkpointing = false"
        )
    if fold_init:  # W - B0 A0 (scaling 1) while the LoRA holds B0 A0: the function stays W's
        if init is None:
            raise FloraError("fold_init folds an init into the base: give the init to fold")
        minus = {m: LoraFactors(f.A, -f.B, 1.0) for m, f in init.items()}
        folded = minus if folded is None else _joined(folded, minus)
    start = time.perf_counter()
    with (
        torch.random.fork_rng(devices=[]),
        peak_memory(device=next(model.parameters()).device) as memory,
        _checkpointing(model, config.gradient_checkpointing),
        applied(model, folded),
    ):
        torch.manual_seed(seed)
        with _lora_injected(model, lora_config) as layers:
            if init is not None:
                _load_init(layers, init, rank, scaling)
            if CORE in trains:
                if init is None or core is None:
                    raise FloraError("training a core R needs an init (its A and B) and a core")
                _insert_cores(layers, core, rank)
            for layer in layers.values():
                for part, weight in zip("AB", _weights(layer), strict=True):
                    weight.requires_grad_(part in trains)
            params = [
                p
                for layer in layers.values()
                for p in (*_weights(layer), *_cores(layer))
                if p.requires_grad
            ]
            curve, tokens = local_steps(
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


def _joined(a: Adapter, b: Adapter) -> Adapter:
    """One adapter whose every module's B @ A is a's plus b's (scaling 1 both)."""
    joined = dict(a)
    for m, f in b.items():
        if m in a:
            f = LoraFactors(torch.cat([a[m].A, f.A]), torch.cat([a[m].B, f.B], dim=1), 1.0)
        joined[m] = f
    return joined


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
    total: torch.Tensor | float = 0.0  # on the device: read once, at the end
    count = 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start : start + batch_size], pad_id)
                n = supervised_tokens(batch["labels"])  # on the host: no sync
                if n == 0:
                    continue
                batch[POSITIONS] = response_positions(batch["labels"])
                with autocast_context(precision, device.type):
                    loss = response_loss(model, to_device(batch, device))
                # mean * count = this batch's summed loss, in float64 as Python's floats add
                total = total + (loss.float() if device.type == "mps" else loss.double()) * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise FloraError("evaluate_loss: no example has a response token; check the labels")
    return float(total) / count


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
