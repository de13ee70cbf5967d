"""No host syncs in the step loop (issue 25): a GPU runs ahead of the host only if nothing in a
micro-batch reads a device value or computes a shape from one.

``torch.cuda.set_sync_debug_mode`` needs a GPU, so the ops that sync are counted here with a
dispatch mode over what runs on the device in a micro-batch (the move, the forward, the loss):
``_local_scalar_dense`` (``.item()``, ``float()``, ``int()``, ``bool()``), ``nonzero``,
``masked_select`` and indexing with a boolean mask. The host's own work (collating, counting
tokens, the response positions) is on CPU tensors and is not counted; the step loop reads the
losses once per round (``read_curve``). What remains is transformers' own: its mask builder reads
the attention mask to choose SDPA's causal fast path (``masking_utils._ignore_causal_mask_sdpa``),
counted apart and bounded."""

from __future__ import annotations

import traceback
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flora.steps
from flora.models import load_model
from flora.training import TrainConfig, train_client

SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item"}


class CountSyncs(TorchDispatchMode):
    """The syncing ops dispatched, and which of them transformers' SDPA mask check made (it
    reads a padded attention mask's values to choose its causal fast path)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.transformers_mask: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.name()
        masked = name.startswith("aten::index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args
            if isinstance(a, (list, tuple))
            for i in a
        )
        if name in SYNCING or masked:
            frames = traceback.extract_stack()
            if any(f.filename.endswith("transformers/masking_utils.py") for f in frames):
                self.transformers_mask.append(name)
            else:
                self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("architecture", "weighting"), [("llama", "tokens"), ("llama", "examples"), ("gpt2", "tokens")]
)
def test_a_micro_batch_never_syncs_and_a_round_reads_its_losses_once(
    monkeypatch, token_examples, architecture, weighting
):
    # Prepare: count the syncing ops inside every micro-batch, and the reads of the curve
    model, tokenizer = load_model(f"tiny-{architecture}")
    counter, reads, micro = CountSyncs(), [], []
    real_micro, real_read = flora.steps._micro_loss, flora.steps.read_curve

    def counted_micro(*args: Any, **kwargs: Any) -> Any:
        micro.append(1)
        with counter:
            return real_micro(*args, **kwargs)

    def counted_read(curve: Any) -> Any:
        reads.append(len(curve))
        return real_read(curve)

    monkeypatch.setattr(flora.steps, "_micro_loss", counted_micro)
    monkeypatch.setattr(flora.steps, "read_curve", counted_read)
    config = TrainConfig(
        batch_size=2, grad_accum=2, max_steps=3, precision="fp32", loss_weighting=weighting
    )
    # Execute
    result = train_client(
        model,
        token_examples,
        rank=2,
        alpha=4,
        target_modules=["q_proj", "v_proj"] if architecture == "llama" else ["c_attn"],
        config=config,
        seed=0,
        pad_id=int(tokenizer.pad_token_id),
    )
    # Assert: 6 micro-batches, not one syncing op of flora's in them; transformers' mask
    # builder reads the attention mask (or, without one, the positions) to choose SDPA's causal
    # fast path: at most 2 reads a forward, its own
    assert len(micro) == 6 and counter.ops == []
    assert len(counter.transformers_mask) <= 2 * 6
    assert reads == [3] and len(result.loss_curve) == 3


def test_the_old_mask_selection_would_have_been_counted(token_examples):
    # the counter sees what it is meant to: a boolean mask and a float() of a loss
    counter = CountSyncs()
    x = torch.arange(6.0)
    with counter:
        y = x[x > 2]
        float(y.sum())
    assert "aten::_local_scalar_dense" in counter.ops and len(counter.ops) >= 2
