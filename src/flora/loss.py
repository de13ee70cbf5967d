"""The causal-LM loss on response tokens, with the LM head run only where the loss looks.

``model(**batch).loss`` runs the LM head (hidden x vocabulary: 576 x 49,152 for SmolLM2, a
fifth of the model's multiply-adds per token) on every position and materialises (B, T, V)
logits, then ignores the prompt and padding positions. :func:`response_loss` runs the decoder,
picks the positions whose next token is a response token, and runs the head on those alone:
the same mean cross-entropy (labels shifted by one, -100 ignored), less compute and memory.
Architectures whose forward does more than ``lm_head(decoder(x))`` (logit soft-capping or
scaling) take the model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from flora.data.prompts import IGNORE_INDEX

__all__ = [
    "HEAD_ONLY_TYPES",
    "POSITIONS",
    "response_loss",
    "response_losses",
    "response_positions",
    "supervised_tokens",
]

# the batch key of the response positions, computed on the host before the batch moves: with
# them, the loss selects its rows with index_select (a known shape) instead of a boolean mask,
# whose data-dependent shape makes a GPU wait for the host (a sync per micro-batch)
POSITIONS = "positions"

# model_type values whose CausalLM forward is exactly lm_head(decoder(...)) before the loss
HEAD_ONLY_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss counts in ``labels`` (B, T): those after the one-token shift
    that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat indices into (B, T-1) of the positions whose next token is a response token
    (N,), in row-major order: what a boolean mask of ``labels[:, 1:] != -100`` selects."""
    return (labels[:, 1:] != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)


def _selected(
    hidden: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states at the response positions (N, H), their targets (N,), positions (N,)):
    through ``batch[POSITIONS]`` where the host gave them (no sync), else a boolean mask."""
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    positions = batch.get(POSITIONS)
    if positions is None:
        positions = response_positions(batch["labels"])
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return (
        flat.index_select(0, positions),
        targets.reshape(-1).index_select(0, positions),
        positions,
    )


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != POSITIONS}


def response_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels``, each (B, T), and
    optionally ``positions`` (:func:`response_positions`, computed on the host). Runs under the
    caller's autocast; the logits are upcast to fp32 before the loss, as transformers does.
    """
    if getattr(model.config, "model_type", None) not in HEAD_ONLY_TYPES:
        return model(**_model_inputs(batch), use_cache=False).loss
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    rows, targets, _ = _selected(hidden, batch)
    logits = head(rows).float()  # (N, V), N = response tokens
    return F.cross_entropy(logits, targets)


def response_losses(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's own mean next-token cross-entropy over its response tokens, (B,).

    What DP-SGD clips (an example's gradient may depend on that example alone) and what
    ``train.loss_weighting = "examples"`` averages. An example without a response token gets 0.
    """
    keep = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)
    if getattr(model.config, "model_type", None) in HEAD_ONLY_TYPES:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        hidden = decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
        ).last_hidden_state
        selected, targets, positions = _selected(hidden, batch)
        logits = head(selected).float()  # (N, V)
    else:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
        )
        logits, targets, positions = _selected(out.logits, batch)
        logits = logits.float()
    token_losses = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    rows = positions // keep.shape[1]  # the example of every response token
    sums = torch.zeros(keep.shape[0], dtype=token_losses.dtype, device=token_losses.device)
    sums = sums.index_add(0, rows, token_losses)
    return sums / keep.sum(dim=1).clamp_min(1)
