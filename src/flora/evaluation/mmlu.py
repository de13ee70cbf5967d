"""MMLU accuracy by log-likelihood of the answer letter, as lm-evaluation-harness scores it.

For each test question the prompt (:func:`flora.evaluation.mmlu_data.format_prompt`, k shots
from dev) is tokenised plainly (no chat template, no special tokens) and the four continuations
" A", " B", " C", " D" (one token each) are scored by their log-probability after the prompt; the
prediction is the argmax. Reading all four from the logits at the last prompt position costs ONE
forward pass per batch of right-padded prompts. The body runs under the chosen precision; the LM
head runs outside autocast on those positions only (bf16 logits would often tie the letters). A
model that post-processes its logits (e.g. Gemma-2's soft-capping) keeps its ranking of the
letters, not its exact log-probs.

Within a subject every prompt starts with the same header and shots, so their common token prefix
runs once and its key/value cache is reused by every batch (mathematically the same logits,
several times fewer tokens through the model). Prompts longer than the model's context lose
shots from the left, then tokens from the left. The figures (weighted accuracy, standard
errors, categories) are :mod:`flora.evaluation.mmlu_results`'.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from flora.devices import autocast_context
from flora.errors import FloraError
from flora.evaluation.mmlu_data import LETTERS, Question, format_prompt
from flora.evaluation.mmlu_results import Score, group_scores, harness_results, summarize

__all__ = [
    "MMLUResult",
    "build_prompt_ids",
    "common_prefix",
    "letter_ids",
    "max_context",
    "score_mmlu",
    "score_prompts",
]


@dataclass
class MMLUResult:
    per_subject: dict[str, tuple[int, int]]  # subject -> (correct, total)
    predictions: dict[str, list[int]]  # subject -> predicted choice per question, 0-3
    shots: int
    seconds: float  # prompt building + scoring, model loading excluded
    available: dict[str, int] = field(default_factory=dict)  # subject -> test questions, unlimited

    @property
    def questions(self) -> int:
        return sum(total for _, total in self.per_subject.values())

    @property
    def questions_per_second(self) -> float:
        return self.questions / self.seconds if self.seconds > 0 else 0.0

    def scores(self) -> dict[str, Score]:
        """``mmlu``, its categories and every subject (:func:`group_scores`)."""
        return group_scores(self.per_subject)

    def harness(self) -> dict[str, dict[str, Any]]:
        """The lm-evaluation-harness results sections (:func:`harness_results`)."""
        return harness_results(self.per_subject, self.available, self.shots)


def letter_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of " A" ... " D"; each must be one token."""
    ids = []
    for letter in LETTERS:
        tokens = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise FloraError(
                f"the tokenizer splits ' {letter}' into {len(tokens)} tokens; the MMLU scorer "
                "needs single-token answer letters"
            )
        ids.append(int(tokens[0]))
    return ids


def max_context(model: PreTrainedModel) -> int:
    """The longest prompt the model takes: its max_position_embeddings (else 2048)."""
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def build_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    question: Question,
    shots: Sequence[Question],
    max_length: int,
) -> list[int]:
    """The prompt's token ids; too long: drop shots from the left, then tokens from the left."""
    ids: list[int] = []
    for first in range(len(shots) + 1):
        text = format_prompt(question, shots[first:])
        ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        if len(ids) <= max_length:
            return ids
    return ids[-max_length:]


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all ``prompts`` share, leaving each at least one token."""
    if not prompts:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def _bias(head: torch.nn.Module) -> torch.Tensor | None:
    bias = getattr(head, "bias", None)
    return bias.float() if isinstance(bias, torch.Tensor) else None


def _split(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """The transformer body, the LM head, and the body's cache argument name."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if not isinstance(decoder, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        raise FloraError(f"{type(model).__name__}: the MMLU scorer needs a decoder and an LM head")
    # transformers 5 names the cache argument ``cache``; earlier versions ``past_key_values``
    names = inspect.signature(decoder.forward).parameters
    return decoder, head, "cache" if "cache" in names else "past_key_values"


def score_prompts(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    choice_ids: Sequence[int],
    *,
    batch_size: int,
    pad_id: int,
    precision: str = "fp32",
    prefix_cache: bool = True,
) -> torch.Tensor:
    """Log-probabilities (N, C) of each choice token right after each prompt.

    The body runs under ``precision``; the head runs outside autocast (fp32 weights: fp32 logits)
    on the B read positions only, since bf16 logits are too coarse: the four letters often tie.
    The caller sets eval mode.
    """
    if batch_size < 1:
        raise FloraError(f"MMLU batch size must be >= 1, got {batch_size}")
    decoder, head, kwarg = _split(model)
    device = next(model.parameters()).device
    choices = torch.tensor(list(choice_ids), device=device)
    out = torch.empty(len(prompts), len(choice_ids))
    shared = common_prefix(prompts) if prefix_cache else 0
    with torch.no_grad():
        prefix = None
        if shared:
            prefix = DynamicCache(config=model.config)
            ids = torch.tensor([list(prompts[0][:shared])], device=device)  # (1, P)
            with autocast_context(precision, device.type):
                decoder(input_ids=ids, **{kwarg: prefix, "use_cache": True})
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            suffixes = [prompts[i][shared:] for i in rows]
            width = max(len(s) for s in suffixes)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, S)
            mask = torch.zeros((len(rows), shared + width), dtype=torch.long)  # (B, P + S)
            for row, suffix in enumerate(suffixes):
                ids[row, : len(suffix)] = torch.tensor(list(suffix), dtype=torch.long)
                mask[row, : shared + len(suffix)] = 1
            extra: dict[str, Any] = {"use_cache": prefix is not None}
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(rows))
                extra[kwarg] = cache
            with autocast_context(precision, device.type):
                hidden = decoder(
                    input_ids=ids.to(device), attention_mask=mask.to(device), **extra
                ).last_hidden_state  # (B, S, H)
            last = torch.tensor([len(s) - 1 for s in suffixes], device=device)  # (B,)
            picked = hidden[torch.arange(len(rows), device=device), last]  # (B, H)
            # (B, V) outside autocast and in fp32, also for a head held in bf16/fp16
            weight = head.weight
            assert isinstance(weight, torch.Tensor)
            if weight.dtype == torch.float32:
                logits = head(picked.float())  # (B, V)
            else:  # a head held in bf16/fp16 (model.dtype): its weights upcast for these rows
                logits = F.linear(picked.float(), weight.float(), _bias(head))
            logprobs = torch.log_softmax(logits, dim=-1)[:, choices]  # (B, C)
            out[torch.tensor(rows)] = logprobs.cpu()
    return out


def score_mmlu(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    test: Mapping[str, Sequence[Question]],
    dev: Mapping[str, Sequence[Question]],
    *,
    shots: int = 5,
    limit_per_subject: int = 0,
    batch_size: int = 8,
    precision: str = "fp32",
    prefix_cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> MMLUResult:
    """k-shot MMLU over ``test`` (first ``limit_per_subject`` questions each; 0: all)."""
    if shots < 0 or limit_per_subject < 0:
        raise FloraError("--shots and --limit-per-subject must be >= 0")
    missing = [s for s in test if shots and len(dev.get(s, [])) < shots]
    if missing:
        raise FloraError(f"MMLU: fewer than {shots} dev questions for {missing[:3]}; lower --shots")
    choice_ids = letter_ids(tokenizer)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    length = max_context(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    per_subject, predictions = {}, {}
    try:
        for subject, questions in test.items():
            chosen = list(questions[:limit_per_subject] if limit_per_subject else questions)
            if not chosen:
                continue
            examples = list(dev.get(subject, []))[:shots]
            prompts = [build_prompt_ids(tokenizer, q, examples, length) for q in chosen]
            logprobs = score_prompts(
                model,
                prompts,
                choice_ids,
                batch_size=batch_size,
                pad_id=pad_id,
                precision=precision,
                prefix_cache=prefix_cache,
            )
            predicted = logprobs.argmax(dim=-1).tolist()
            correct = sum(int(p == q.answer) for p, q in zip(predicted, chosen, strict=True))
            per_subject[subject] = (correct, len(chosen))
            predictions[subject] = predicted
            if progress is not None:
                progress(subject)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    summarize(per_subject)  # FloraError when no question was scored
    available = {subject: len(questions) for subject, questions in test.items()}
    return MMLUResult(per_subject, predictions, shots, seconds, available)
