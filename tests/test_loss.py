"""response_loss: the model's own causal-LM loss, with the LM head on response positions only."""

from __future__ import annotations

import pytest
import torch

from flora.data import collate
from flora.loss import response_loss
from flora.models import autocast_context

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_equals_the_models_own_loss_and_gradients(tiny_model, token_examples, tokenizer, precision):
    # Prepare: a right-padded batch with prompt and padding positions to ignore
    batch = collate(token_examples, tokenizer.pad_token_id)
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()
    tiny_model.train()
    # Execute: both losses and their gradients on every weight
    with autocast_context(precision):
        theirs = tiny_model(**batch, use_cache=False).loss
    theirs.backward()
    expected = _grads(tiny_model)
    tiny_model.zero_grad(set_to_none=True)
    with autocast_context(precision):
        ours = response_loss(tiny_model, batch)
    ours.backward()
    got = _grads(tiny_model)
    # Assert
    tol = 1e-6 if precision == "fp32" else 1e-2
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=10 * tol, atol=10 * tol, msg=name
        )


def test_other_architectures_take_the_models_forward(
    tiny_model, token_examples, tokenizer, monkeypatch
):
    batch = collate(token_examples, tokenizer.pad_token_id)
    monkeypatch.setattr(tiny_model.config, "model_type", "gemma2")
    calls = []
    monkeypatch.setattr(tiny_model, "get_decoder", lambda: calls.append("decoder"))
    loss = response_loss(tiny_model, batch)
    assert calls == [] and torch.isfinite(loss)
