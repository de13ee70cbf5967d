"""The run configuration: typed dataclasses, read from one TOML file with dotted overrides.

    cfg = load_config("configs/default.toml", ["federation.rounds=3", "train.lr=1e-4"])

Every section is validated in ``__post_init__``; unknown keys and wrong types raise FloraError
naming the dotted key and the fix. The resolved config is saved as JSON beside every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora.aggregation.registry import METHODS
from flora.data.partition import SCHEMES
from flora.data.prompts import TEMPLATES, TRUNCATIONS
from flora.errors import FloraError, need
from flora.optim import OPTIMIZERS, SCHEDULES
from flora.privacy.config import PrivacyConfig, dp_sgd_refusal
from flora.sinks import SINKS

__all__ = [
    "BASE_DTYPES",
    "PRECISIONS",
    "QUANTIZATIONS",
    "RANK_PROFILES",
    "RECORDED",
    "DataConfig",
    "EvalConfig",
    "FederationConfig",
    "FlowerConfig",
    "LoraSpec",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "ScreeningConfig",
    "TrainConfig",
    "config_fingerprint",
    "config_from_dict",
    "config_to_dict",
    "config_toml",
    "extend_rounds",
    "load_config",
    "load_run_config",
    "parse_override",
]

# Named per-client rank lists; "hetero-10" is the FLoRA paper's heterogeneous setting.
RANK_PROFILES: dict[str, list[int]] = {
    "hetero-10": [64, 32, 16, 16, 8, 8, 4, 4, 4, 4],
    "homo-16": [16] * 10,
    "hetero-3": [16, 8, 4],
}
CATCH_UPS = ("replay", "svd", "auto")
# "auto": bf16 where the device runs it (a GPU with bf16, a CPU with native bf16), else fp16 on a
# GPU without bf16, else fp32; fp16 trains with a gradient scaler. See docs/devices.md.
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
# what the frozen base's weights are held in ("auto": bf16 on a GPU training in bf16, else fp32)
BASE_DTYPES = ("auto", "fp32", "bf16", "fp16")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
QUANTIZATIONS = (0, 4, 8)  # bitsandbytes: 4 = NF4 (QLoRA), 8 = LLM.int8; 0 = none
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# keys that moved, with where they went: a config using the old place is told the new one
MOVED = {
    "federation.tau": "federation.options.tau (with method = 'florist')",
    "federation.weighting": "federation.options.weighting (with method = 'zero-padding')",
}


@dataclass
class ModelConfig:
    name: str = field(
        default="smollm2",
        metadata={
            "help": '"smollm2" (packaged), "tiny-llama" / "tiny-qwen2" / "tiny-gemma" / '
            '"tiny-gpt2" (random, for tests), or an HF path / hub id'
        },
    )
    target_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "the linear layers that get a LoRA; empty: peft's default for the model's "
            "architecture (q_proj, v_proj for Llama, Qwen2, Gemma; c_attn for GPT-2), "
            "resolved when the run starts"
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": 'what the frozen base\'s weights are held in: "fp32", or "bf16" / "fp16" to '
            "halve their memory (the forward passes then run in that precision: "
            'train.precision must match); "auto": bf16 on a GPU that trains in bf16 (target '
            "modules kept fp32), fp32 elsewhere"
        },
    )
    attention: str = field(
        default="auto",
        metadata={
            "help": 'the attention kernels: "sdpa" (PyTorch\'s fused attention), "eager", '
            '"flash_attention_2" (needs the flash-attn package), or "auto": flash-attention 2 '
            "where installed with a half-precision base on CUDA, else sdpa"
        },
    )
    quantization: int = field(
        default=0,
        metadata={
            "help": "4 (NF4, QLoRA) or 8 (LLM.int8): load the frozen base "
            "quantised through bitsandbytes"
        },
    )
    exact_merge: bool = field(
        default=True,
        metadata={
            "help": "with a bf16/fp16/quantised base, keep the target modules' weights in fp32 "
            "(master copies), so every merged update adds exactly; false: they take the base's "
            "precision (merges round)"
        },
    )

    def __post_init__(self) -> None:
        need(bool(self.name), "model.name", self.name, "a model spec such as 'smollm2'")
        need(self.dtype in BASE_DTYPES, "model.dtype", self.dtype, f"one of {BASE_DTYPES}")
        need(
            self.attention in ATTENTIONS, "model.attention", self.attention, f"one of {ATTENTIONS}"
        )
        need(
            self.quantization in QUANTIZATIONS,
            "model.quantization",
            self.quantization,
            "0 (none), 4 (NF4) or 8 (LLM.int8)",
        )
        if self.quantization and not self.exact_merge:
            raise FloraError(
                "model.exact_merge = false needs model.quantization = 0: quantised weights "
                "cannot take an update, so flora keeps the target modules in fp32; set "
                "model.exact_merge = true"
            )

    @property
    def low_precision(self) -> bool:
        """Whether the base may be held below fp32 (bf16, fp16, "auto" or quantised)."""
        return self.dtype != "fp32" or self.quantization > 0


@dataclass
class DataConfig:
    source: str = field(
        default="dolly",
        metadata={
            "help": '"dolly" (shared copy, else the hub), a '
            ".json/.jsonl/.csv/.parquet file, or a hub id"
        },
    )
    subset: str = field(
        default="", metadata={"help": 'the hub dataset\'s subset (config name); "" for none'}
    )
    split: str = field(default="train", metadata={"help": "the hub dataset's split"})
    fields: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "flora's fields -> the dataset's columns, e.g. {instruction = "
            '"question", response = "answer"} or {messages = "conversation"}; empty: detect '
            "flora/Dolly, Alpaca or chat"
        },
    )
    template: str = field(
        default="chat", metadata={"help": '"chat" (the tokenizer\'s chat template) or "alpaca"'}
    )
    max_length: int = field(
        default=256, metadata={"help": "tokens per example (prompt and response)"}
    )
    min_response_tokens: int = field(
        default=32,
        metadata={
            "help": "a longer example keeps this many answer tokens (all, if fewer): its "
            'context is cut first, then its instruction; "end" cuts at the end instead '
            "(the reference code's rule)"
        },
    )
    truncation: str = field(
        default="keep-answer",
        metadata={
            "help": 'how a longer example is cut: "keep-answer" (see min_response_tokens) or '
            '"end" (at the end)'
        },
    )
    limit: int = field(
        default=0, metadata={"help": "use a seeded random subset of this many rows (0: all)"}
    )
    heldout: int = field(
        default=200, metadata={"help": "held-out examples for the loss before/after (seeded split)"}
    )
    partition: str = field(
        default="iid",
        metadata={
            "help": 'flwr-datasets\' partitioners: "iid", "dirichlet", "shards" and "pathological" '
            '(over label_column), "natural-id" (one client per value of natural_id_column)'
        },
    )
    label_column: str = field(
        default="category", metadata={"help": 'any column; rows without one get the label "all"'}
    )
    dirichlet_alpha: float = field(
        default=0.5,
        metadata={
            "help": "dirichlet: the concentration of each label's split across the clients "
            "(small: each client holds few labels; large: close to iid)"
        },
    )
    min_partition_size: int = field(
        default=1, metadata={"help": "dirichlet: draw again until every client has this many rows"}
    )
    shards_per_client: int = field(
        default=2, metadata={"help": "shards: label-sorted shards per client"}
    )
    classes_per_client: int = field(default=2, metadata={"help": "pathological: labels per client"})
    natural_id_column: str = field(
        default="", metadata={"help": 'natural-id: e.g. "user_id" (one client per user)'}
    )
    shift_client: int = field(
        default=-1,
        metadata={
            "help": "robustness: client shift_client (-1: none) holds only rows labelled "
            "shift_category, as many as the partition gave it, swapped with the other "
            "clients' (flora.data.shift)"
        },
    )
    shift_category: str = field(
        default="", metadata={"help": "robustness: the label that shift_client's rows all hold"}
    )

    def __post_init__(self) -> None:
        need(self.template in TEMPLATES, "data.template", self.template, f"one of {TEMPLATES}")
        need(self.max_length >= 16, "data.max_length", self.max_length, "an integer >= 16")
        need(
            1 <= self.min_response_tokens < self.max_length,
            "data.min_response_tokens",
            self.min_response_tokens,
            f"an integer from 1 to data.max_length - 1 = {self.max_length - 1}",
        )
        need(
            self.truncation in TRUNCATIONS,
            "data.truncation",
            self.truncation,
            f"one of {TRUNCATIONS}",
        )
        need(self.limit >= 0, "data.limit", self.limit, ">= 0 (0: all rows)")
        need(self.heldout >= 1, "data.heldout", self.heldout, "an integer >= 1")
        need(self.partition in SCHEMES, "data.partition", self.partition, f"one of {SCHEMES}")
        need(self.dirichlet_alpha > 0, "data.dirichlet_alpha", self.dirichlet_alpha, "> 0")
        need(self.shards_per_client >= 1, "data.shards_per_client", self.shards_per_client, ">= 1")
        need(
            self.min_partition_size >= 0, "data.min_partition_size", self.min_partition_size, ">= 0"
        )
        need(
            self.classes_per_client >= 1, "data.classes_per_client", self.classes_per_client, ">= 1"
        )
        need(
            self.partition != "natural-id" or bool(self.natural_id_column),
            "data.natural_id_column",
            self.natural_id_column,
            "a column name with data.partition = 'natural-id'",
        )
        need(
            self.shift_client >= -1,
            "data.shift_client",
            self.shift_client,
            "a client index, or -1 for no shift",
        )
        need(
            self.shift_client == -1 or bool(self.shift_category),
            "data.shift_category",
            self.shift_category,
            "a label (e.g. 'open_qa') with data.shift_client",
        )


@dataclass
class LoraSpec:
    ranks: list[int] | str = field(
        default="hetero-10",
        metadata={"help": "per-client ranks, or a profile name (RANK_PROFILES)"},
    )
    alpha_ratio: float = field(
        default=2.0,
        metadata={"help": "lora_alpha = alpha_ratio * r on every client (scaling alpha / r)"},
    )
    use_rslora: bool = field(default=False, metadata={"help": "scaling alpha / sqrt(r)"})

    def __post_init__(self) -> None:
        if isinstance(self.ranks, str):
            need(
                self.ranks in RANK_PROFILES,
                "lora.ranks",
                self.ranks,
                f"a list of ints or a profile: {', '.join(RANK_PROFILES)}",
            )
        else:
            need(
                bool(self.ranks) and all(isinstance(r, int) and r >= 1 for r in self.ranks),
                "lora.ranks",
                self.ranks,
                "a non-empty list of integers >= 1",
            )
        need(self.alpha_ratio > 0, "lora.alpha_ratio", self.alpha_ratio, "> 0")

    def rank_list(self) -> list[int]:
        return list(RANK_PROFILES[self.ranks]) if isinstance(self.ranks, str) else list(self.ranks)


@dataclass
class FederationConfig:
    method: str = field(default="flora", metadata={"help": "any name in flora.aggregation.METHODS"})
    num_clients: int = field(
        default=10, metadata={"help": "clients in the federation; lora.ranks gives each its rank"}
    )
    rounds: int = field(
        default=2,
        metadata={"help": "each round samples clients, trains them locally and aggregates"},
    )
    fraction: float = field(default=1.0, metadata={"help": "share of clients sampled each round"})
    min_clients: int = field(default=1, metadata={"help": "at least this many per round"})
    centralized: bool = field(
        default=False,
        metadata={"help": "baseline: all training data on one client of rank max(ranks)"},
    )
    catch_up: str = field(
        default="replay",
        metadata={
            "help": 'missed merged updates: "replay" them, "svd" (one exact re-factoring), or '
            '"auto" (the fewest bytes of replay, svd and one dense update)'
        },
    )
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "the method's own options ([federation.options]: florist's tau and energy, "
            "zero-padding's weighting; see `flora aggregate --help`), checked against the "
            "method, defaults filled in"
        },
    )

    def __post_init__(self) -> None:
        need(self.method in METHODS, "federation.method", self.method, f"one of {list(METHODS)}")
        need(self.num_clients >= 1, "federation.num_clients", self.num_clients, ">= 1")
        need(self.rounds >= 1, "federation.rounds", self.rounds, ">= 1")
        need(0 < self.fraction <= 1, "federation.fraction", self.fraction, "in (0, 1]")
        need(
            1 <= self.min_clients <= self.num_clients,
            "federation.min_clients",
            self.min_clients,
            f"between 1 and num_clients ({self.num_clients})",
        )
        need(
            self.catch_up in CATCH_UPS, "federation.catch_up", self.catch_up, f"one of {CATCH_UPS}"
        )
        self.options = METHODS[self.method].resolve(self.options, "federation.options.")


SAMPLINGS = ("auto", "shuffle", "poisson")
LOSS_WEIGHTINGS = ("auto", "tokens", "examples")


@dataclass
class TrainConfig:
    """How one client trains locally in one round."""

    lr: float = field(
        default=2e-4, metadata={"help": "peak learning rate of the LoRA factors' optimiser"}
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": 'optimiser of the LoRA factors (flora.optim): "adamw" (torch.optim.AdamW), '
            '"adamw-fused" (the same update in one fused kernel, on CUDA, CPU or MPS; equal up '
            'to rounding) or "sgd" (plain SGD, where weight_decay is an L2 term)'
        },
    )
    batch_size: int = field(
        default=8, metadata={"help": "examples per micro-batch (one forward/backward)"}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    local_epochs: float = field(
        default=1.0, metadata={"help": "passes over the client's data; fractions allowed"}
    )
    max_steps: int = field(
        default=0,
        metadata={"help": "optimizer steps per round; when > 0 it overrides local_epochs"},
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "fraction of the steps spent ramping the lr up linearly"}
    )
    schedule: str = field(
        default="linear", metadata={"help": 'decay after warmup: "linear", "cosine" or "constant"'}
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": "global grad-norm clip over the LoRA params; 0 disables it (DP-SGD clips every "
            "example's gradient to privacy.max_grad_norm instead, and this one is not used)"
        },
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "weight decay on the LoRA factors (decoupled in AdamW, L2 in sgd)"},
    )
    lora_dropout: float = field(
        default=0.05, metadata={"help": "dropout on the LoRA branch's input"}
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": 'autocast: "fp32", "bf16", "fp16" (with a grad scaler) or "auto": bf16 on '
            "GPUs that have it, fp16 on older ones, bf16 on CPUs with AMX/AVX512-BF16, else fp32 "
            "(docs/devices.md)"
        },
    )
    deterministic: bool = field(
        default=False,
        metadata={
            "help": "torch's deterministic algorithms (and cuBLAS' fixed workspace) for bitwise "
            "repeatable runs on CUDA, at some speed; the CPU is deterministic already"
        },
    )
    tf32: bool = field(
        default=True,
        metadata={
            "help": "on CUDA, TF32 for the matmuls that stay fp32 (Ampere and later); false: "
            "full fp32"
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": 'where the client trains and the server evaluates: "auto" (CUDA, '
            'else MPS, else CPU), "cpu", "cuda", "cuda:N" or "mps"; a Flower node\'s own '
            "node config `device` wins"
        },
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "batch examples of similar length together: less padding"}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "each micro-batch's examples end to end in one row, no padding, attention "
            "kept within each example (position ids restart); the same examples and loss per "
            "step. Token-weighted loss only (not DP-SGD)"
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute the activations in the backward pass instead of keeping them: "
            "less memory for more compute, the same loss and gradients (transformers' "
            "non-reentrant checkpointing)"
        },
    )
    sampling: str = field(
        default="auto",
        metadata={
            "help": 'a step\'s batch: "shuffle" (batch_size x grad_accum examples of each '
            'epoch\'s shuffle) or "poisson" (each example with probability batch_size x '
            'grad_accum / n, as DP-SGD\'s accountant assumes); "auto": poisson with privacy.mode '
            '= "dp-sgd", else shuffle'
        },
    )
    loss_weighting: str = field(
        default="auto",
        metadata={
            "help": 'a step\'s loss: "tokens" (the mean over all its response tokens) or '
            '"examples" (the mean of each example\'s own mean, which DP-SGD clips); "auto": '
            "examples with dp-sgd, else tokens"
        },
    )

    def __post_init__(self) -> None:
        _check(self.lr >= 0 and math.isfinite(self.lr), "lr", self.lr, "a finite number >= 0")
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        _check(
            self.local_epochs >= 0 and math.isfinite(self.local_epochs),
            "local_epochs",
            self.local_epochs,
            "a finite number >= 0",
        )
        _check(
            isinstance(self.max_steps, int) and self.max_steps >= 0,
            "max_steps",
            self.max_steps,
            "an integer >= 0 (0 means: use local_epochs)",
        )
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        optimizers, schedules = tuple(OPTIMIZERS), tuple(SCHEDULES)
        _check(self.optimizer in optimizers, "optimizer", self.optimizer, f"one of {optimizers}")
        _check(self.schedule in schedules, "schedule", self.schedule, f"one of {schedules}")
        _check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0: no clip)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")
        _check(self.precision in PRECISIONS, "precision", self.precision, f"one of {PRECISIONS}")
        _check(
            isinstance(self.device, str) and bool(DEVICE_PATTERN.match(self.device)),
            "device",
            self.device,
            "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
        )
        _check(self.sampling in SAMPLINGS, "sampling", self.sampling, f"one of {SAMPLINGS}")
        _check(
            self.loss_weighting in LOSS_WEIGHTINGS,
            "loss_weighting",
            self.loss_weighting,
            f"one of {LOSS_WEIGHTINGS}",
        )
        if self.packing and self.loss_weighting == "examples":
            raise FloraError(
                "train.packing with train.loss_weighting = 'examples': a packed row mixes "
                "examples, so their own means are not its rows'; set train.loss_weighting = "
                "'tokens' (or 'auto'), or train.packing = false"
            )

    def resolved(self, private: bool) -> tuple[str, str]:
        """(sampling, loss weighting), "auto" resolved for a DP-SGD (``private``) run or not."""
        sampling = self.sampling
        if sampling == "auto":
            sampling = "poisson" if private else "shuffle"
        weighting = self.loss_weighting
        if weighting == "auto":
            weighting = "examples" if private else "tokens"
        return sampling, weighting

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps for a client holding ``num_examples`` examples."""
        if self.max_steps > 0:
            return self.max_steps
        return math.ceil(self._micro_batches(num_examples) / self.grad_accum)

    def _micro_batches(self, num_examples: int) -> int:
        if self.max_steps > 0:
            return self.max_steps * self.grad_accum
        return math.ceil(self.local_epochs * math.ceil(num_examples / self.batch_size))


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise FloraError(f"train.{name} must be {expected}, got {value!r}")


@dataclass
class EvalConfig:
    every: int = field(
        default=0, metadata={"help": "held-out loss every N rounds (0: only before and after)"}
    )
    batch_size: int = field(
        default=8, metadata={"help": "examples per forward pass for the held-out loss and MMLU"}
    )
    samples: int = field(
        default=1,
        metadata={"help": "answers generated before and after for the first N held-out prompts"},
    )
    max_new_tokens: int = field(
        default=48,
        metadata={
            "help": "the length limit of each generated sample answer (at most the model's "
            "context less the prompt)"
        },
    )
    no_repeat_ngram_size: int = field(
        default=3,
        metadata={
            "help": "greedy samples never repeat an n-gram of this many tokens (ends the loops "
            "small models fall into); 0: plain greedy"
        },
    )
    mmlu: bool = field(
        default=False,
        metadata={"help": "k-shot MMLU of the global model before round 1 and after the last"},
    )
    mmlu_every: int = field(
        default=0, metadata={"help": "MMLU also every N rounds (0: only before and after)"}
    )
    mmlu_limit_per_subject: int = field(
        default=10, metadata={"help": "questions per subject (0: all 14,042)"}
    )
    mmlu_shots: int = field(
        default=5, metadata={"help": "worked examples (from MMLU's dev split) before each question"}
    )

    def __post_init__(self) -> None:
        need(self.every >= 0, "eval.every", self.every, ">= 0")
        need(self.batch_size >= 1, "eval.batch_size", self.batch_size, ">= 1")
        need(self.samples >= 0, "eval.samples", self.samples, ">= 0")
        need(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, ">= 1")
        need(
            self.no_repeat_ngram_size >= 0,
            "eval.no_repeat_ngram_size",
            self.no_repeat_ngram_size,
            ">= 0 (0: plain greedy)",
        )
        need(self.mmlu_every >= 0, "eval.mmlu_every", self.mmlu_every, ">= 0")
        needs = "0 unless eval.mmlu = true (set eval.mmlu = true to score MMLU in the run)"
        need(self.mmlu_every == 0 or self.mmlu, "eval.mmlu_every", self.mmlu_every, needs)
        need(
            self.mmlu_limit_per_subject >= 0,
            "eval.mmlu_limit_per_subject",
            self.mmlu_limit_per_subject,
            ">= 0 (0: every question)",
        )
        need(self.mmlu_shots >= 0, "eval.mmlu_shots", self.mmlu_shots, ">= 0")

    def heldout_at(self, round: int, last: int) -> bool:
        """Whether the run measures the held-out loss after ``round`` (0: before training)."""
        return _due(round, last, self.every)

    def mmlu_at(self, round: int, last: int) -> bool:
        """Whether the run scores MMLU after ``round`` (0: before training)."""
        return self.mmlu and _due(round, last, self.mmlu_every)


def _due(round: int, last: int, every: int) -> bool:
    """The one evaluation rule: before training, after the last round, and every ``every``."""
    return round in (0, last) or bool(every and round % every == 0)


@dataclass
class ScreeningConfig:
    """What the server accepts of an upload before aggregating it (flora.aggregation.screen):
    besides these bounds, always the target modules, shapes, assigned rank, floating finite
    values, the frozen A, and an example count within the client's partition."""

    max_update_norm: float = field(
        default=0.0,
        metadata={
            "help": "||s B A||_F per module above this is rejected or "
            "clipped (0: no absolute bound)"
        },
    )
    norm_multiple: float = field(
        default=3.0,
        metadata={
            "help": "||s B A||_F per module above this multiple of the median of the round's "
            "other uploads is clipped or rejected (0: off); 3 bounds a 50x scaler near the "
            "honest variation (docs/robustness.md)"
        },
    )
    norm_action: str = field(
        default="clip", metadata={"help": '"clip" the upload onto the bound, or "reject" it'}
    )
    rank_normalized: bool = field(
        default=True,
        metadata={
            "help": "norm_multiple compares ||s B A||_F / sqrt(rank): honest norms grow as "
            "sqrt(rank), so clients of large ranks are not clipped (false: raw norms)"
        },
    )
    max_examples: int = field(
        default=0,
        metadata={
            "help": "example counts above this are rejected where the server knows no "
            "partition size (0: none)"
        },
    )

    def __post_init__(self) -> None:
        need(
            self.max_update_norm >= 0,
            "screening.max_update_norm",
            self.max_update_norm,
            ">= 0 (0: no absolute bound)",
        )
        need(
            self.norm_multiple == 0 or self.norm_multiple >= 1,
            "screening.norm_multiple",
            self.norm_multiple,
            "0 (off) or >= 1",
        )
        need(
            self.norm_action in ("reject", "clip"),
            "screening.norm_action",
            self.norm_action,
            "'reject' or 'clip'",
        )
        need(self.max_examples >= 0, "screening.max_examples", self.max_examples, ">= 0")


@dataclass
class FlowerConfig:
    """Resources of one client on Flower's simulation runtime (Ray); a deployment's nodes take
    theirs from their own machine (node config ``device``)."""

    client_cpus: int = field(default=1, metadata={"help": "CPU cores per simulated client"})
    client_gpus: float | None = field(
        default=None,
        metadata={
            "help": "GPUs per simulated client (0.25: four clients share one GPU at a time); "
            "unset: 1 when train.device is a GPU, else 0"
        },
    )

    def __post_init__(self) -> None:
        need(self.client_cpus >= 1, "flower.client_cpus", self.client_cpus, "an integer >= 1")
        need(
            self.client_gpus is None or self.client_gpus >= 0,
            "flower.client_gpus",
            self.client_gpus,
            ">= 0 (a fraction shares a GPU between clients)",
        )


@dataclass
class OutputConfig:
    model: bool = field(
        default=True,
        metadata={
            "help": "final/model: the base with the whole update merged, a full copy of the "
            "model (517 MB at 135M, about 28 GB at 7B); false: final/adapter only, which "
            "PEFT loads onto the base"
        },
    )
    # the trackers that get every metrics row besides metrics.jsonl (always written, the record
    # of truth): "tensorboard", "wandb", "mlflow"; each an extra: pip install 'flora-lora[wandb]'
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": 'trackers that get every metrics row besides metrics.jsonl: "tensorboard" '
            '(tensorboard/ in the run directory), "wandb" (wandb/ there, offline or online as '
            'WANDB_MODE says), "mlflow" (mlflow/mlflow.db there, or MLFLOW_TRACKING_URI); each '
            "is an extra, e.g. pip install 'flora-lora[wandb]' (flora.sinks)"
        },
    )

    def __post_init__(self) -> None:
        need(
            all(name in SINKS for name in self.report_to)
            and len(set(self.report_to)) == len(self.report_to),
            "output.report_to",
            self.report_to,
            f"a list of distinct tracker names from {sorted(SINKS)} ([]: metrics.jsonl only)",
        )


@dataclass
class RunConfig:
    seed: int = field(
        default=0,
        metadata={
            "help": "all randomness (split, partition, sampling, init, data order) derives from it"
        },
    )
    threads: int = field(
        default=0,
        metadata={"help": "torch CPU threads (0: torch's default); 1 is faster on a busy machine"},
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        need(self.threads >= 0, "threads", self.threads, ">= 0 (0: torch's default)")
        # numpy's seeds stop at 2^32 - 1 (torch's at 2^64 - 1): larger ones would fail mid-run
        need(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2^32)")
        self._check_privacy()
        ranks = self.lora.rank_list()
        if not self.federation.centralized:
            need(
                len(ranks) == self.federation.num_clients,
                "lora.ranks",
                ranks,
                f"one rank per client ({self.federation.num_clients} clients)",
            )
        if not self.federation.centralized:
            need(
                self.data.shift_client < self.federation.num_clients,
                "data.shift_client",
                self.data.shift_client,
                f"a client index below federation.num_clients = {self.federation.num_clients}",
            )
        method = METHODS[self.federation.method]
        if not method.mixed_ranks and len(set(ranks)) > 1 and not self.federation.centralized:
            raise FloraError(
                f"federation.method {method.name} needs equal ranks but lora.ranks is {ranks}; "
                "use a homogeneous profile such as 'homo-16' or a mixed-rank method (flora)"
            )

        dtype, precision = self.model.dtype, self.train.precision
        if dtype not in ("fp32", "auto") and precision not in (dtype, "auto"):
            raise FloraError(
                f"train.precision = {precision!r} with model.dtype = {dtype!r}: the forward "
                f"passes run in the base's precision; set train.precision = {dtype!r} (or "
                "'auto'), or model.dtype = 'fp32'"
            )

    def _check_privacy(self) -> None:
        privacy, train, method = self.privacy, self.train, METHODS[self.federation.method]
        if privacy.mode == "dp-sgd":
            refusal = dp_sgd_refusal(train, self.model.dtype)
            if refusal is not None:
                raise FloraError(refusal)
        if privacy.mode == "client-level":
            if not method.client_dp:
                raise FloraError(
                    f"privacy.mode = 'client-level' with federation.method = {method.name!r}: "
                    f"{method.client_dp_refusal}; use privacy.mode = 'dp-sgd' (sample-level, "
                    "every method) or federation.method = 'fedit' or 'ffa-lora'"
                )
            robust = self.federation.options.get("robust", "mean")
            if robust != "mean":
                raise FloraError(
                    f"privacy.mode = 'client-level' with federation.options.robust = {robust!r}: "
                    "its noise is calibrated to the mean of the clipped updates; set "
                    "federation.options.robust = 'mean' (the clipping bounds every client)"
                )
            if self.federation.centralized:
                raise FloraError(
                    "privacy.mode = 'client-level' with federation.centralized: one client "
                    "has no others to hide among; use privacy.mode = 'dp-sgd'"
                )

    def client_ranks(self) -> list[int]:
        ranks = self.lora.rank_list()
        return [max(ranks)] if self.federation.centralized else ranks


# --- TOML + dotted overrides -> dataclasses ---------------------------------------------------


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a simple annotation (int, float, str, bool, list[int], unions)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except FloraError:
                continue
        raise FloraError(f"{key}: {value!r} does not fit {annotation}")
    if annotation is type(None) and value is None:  # a JSON null (config.json) for "unset"
        return None
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise FloraError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise FloraError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (str, bool) and isinstance(value, annotation):
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise FloraError(f"'{key}' is a table; write [{key}] with keys under it")
        return dict(value)
    raise FloraError(
        f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}"
    )


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in MOVED:
            raise FloraError(f"config key '{dotted}' moved: write it as {MOVED[dotted]}")
        if key not in names:
            raise FloraError(f"unknown config key '{dotted}'; valid keys here: {', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise FloraError(f"'{dotted}' is a section; write [{dotted}] with keys under it")
            kwargs[key] = _build(hint, value, f"{dotted}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    try:
        return cls(**kwargs)
    except FloraError as error:
        message = str(error)
        if prefix and not message.startswith(prefix) and message.startswith(tuple(names)):
            message = prefix + message
        raise FloraError(message) from None


RECORDED = "recorded"
"""config.json's block of what a run resolved (device, precision) and library versions."""


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from nested dicts (TOML or JSON)."""
    return typing.cast(RunConfig, _build(RunConfig, data, ""))


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_fingerprint(config: RunConfig) -> str:
    """SHA-256 of the config as JSON, without federation.rounds (which a resume may raise):
    checkpoints record it, and resuming refuses a config that differs in anything else."""
    data = config_to_dict(config)
    data["federation"] = {k: v for k, v in data["federation"].items() if k != "rounds"}
    for (section, key), default in _LATER_FIELDS.items():  # at their defaults: as before them
        if data[section].get(key) == default:
            del data[section][key]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# Fields added after runs were first checkpointed, left out of the fingerprint while they hold
# their default (the behaviour of the runs written before them), so those runs still resume.
_LATER_FIELDS: dict[tuple[str, str], Any] = {
    ("output", "report_to"): [],
    ("train", "optimizer"): "adamw",
    ("screening", "rank_normalized"): False,
    ("model", "attention"): "auto",
    ("train", "tf32"): False,
    ("train", "deterministic"): False,
    ("train", "packing"): False,
}


def load_run_config(run_dir: Path) -> RunConfig:
    """The config a run directory was started with (its config.json)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FloraError(f"{run_dir}: no config.json; is it a flora run directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as error:
        raise FloraError(
            f"{path}: unreadable ({type(error).__name__}: {str(error)[:120]}); restore the run's "
            "config.json, or start a new run"
        ) from None
    if not isinstance(data, dict):
        raise FloraError(f"{path}: not a run config (a JSON object); restore the run's config.json")
    data.pop(RECORDED, None)  # what the settings resolved to, and versions: not settings
    federation = data.get("federation", {})
    if "tau" in federation or "weighting" in federation:  # written before federation.options
        method = METHODS.get(str(federation.get("method")))
        taken = {o.name for o in method.options} if method else set()
        options = federation.setdefault("options", {})
        for key in ("tau", "weighting"):
            value = federation.pop(key, None)
            if key in taken:
                options.setdefault(key, value)
    screening = data.get("screening")
    if isinstance(screening, dict):  # written before rank_normalized: raw norms, as it ran
        screening.setdefault("rank_normalized", False)
    train = data.get("train")
    if isinstance(train, dict):  # written before train.tf32: full fp32 matmuls, as it ran
        train.setdefault("tf32", False)
    return config_from_dict(data)


def extend_rounds(config: RunConfig, rounds: int) -> RunConfig:
    """A resumed run's config with ``rounds`` as its new last round (``flora run --resume
    --rounds N``, the Flower app's run config ``rounds``); fewer rounds, or more under an
    epsilon budget, are refused."""
    if rounds < config.federation.rounds:
        raise FloraError(
            f"--rounds {rounds}: the run already has {config.federation.rounds} rounds; give a "
            "larger N to extend it"
        )
    if rounds > config.federation.rounds and config.privacy.epsilon > 0:
        raise FloraError(
            f"--rounds {rounds}: this run's noise was set to spend privacy.epsilon = "
            f"{config.privacy.epsilon:g} over {config.federation.rounds} rounds, and more rounds "
            "would spend more; start a new run (or one with privacy.noise_multiplier and "
            "privacy.epsilon = 0, whose rows report the epsilon spent)"
        )
    federation = dataclasses.replace(config.federation, rounds=rounds)
    return dataclasses.replace(config, federation=federation)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); value parsed as TOML, else taken as a string."""
    if "=" not in text:
        raise FloraError(f"--set '{text}': expected key=value, e.g. federation.rounds=3")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (None: the defaults), apply ``a.b=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FloraError(f"config file {file} not found; see configs/ for ready ones")
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise FloraError(f"{file}: invalid TOML ({error})") from None
        except UnicodeDecodeError as error:
            raise FloraError(
                f"{file}: byte {error.start} is not UTF-8 text; save the config as UTF-8"
            ) from None
        except RecursionError:
            raise FloraError(f"{file}: nested too deeply to read; flatten its tables") from None
    for override in overrides or []:
        keys, value = parse_override(override)
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FloraError(f"--set {override}: '{part}' is not a section")
        node[keys[-1]] = value
    return config_from_dict(data)


def config_toml(config: RunConfig) -> str:
    """``config`` as TOML that loads back to the same config (unset values as comments)."""
    data = config_to_dict(config)
    top = [f"{k} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    sections = [
        "\n".join([f"[{name}]", *(_entry(k, v) for k, v in table.items())])
        for name, table in data.items()
        if isinstance(table, dict)
    ]
    return "\n\n".join(["\n".join(top), *sections]) + "\n"


def _entry(key: str, value: Any) -> str:
    return f"# {key}: unset" if value is None else f"{key} = {_value(value)}"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + "}"
    return repr(value)
