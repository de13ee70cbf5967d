"""``train.packing`` (issue 25): a micro-batch's examples in one row with restarting position ids,
attention kept within each example, the same loss as the padded batch; no padding on Dolly."""

from __future__ import annotations

import pytest
import torch

from flora.config import load_config
from flora.data.batching import collate, pack
from flora.errors import FloraError
from flora.loss import response_loss
from flora.models import load_model
from flora.training import TrainConfig, train_client

ROWS = [([1, 5, 6, 7, 8, 9, 10, 11], 3), ([1, 12, 13, 14, 15], 2), ([1, 16, 17, 18, 19, 20], 4)]
EXAMPLES = [{"input_ids": ids, "labels": [-100] * p + ids[p:]} for ids, p in ROWS]


def test_pack_lays_examples_end_to_end_with_restarting_positions():
    row = pack(EXAMPLES)
    assert row["input_ids"].shape == (1, 8 + 5 + 6)
    assert row["position_ids"][0].tolist() == [*range(8), *range(5), *range(6)]
    labels = row["labels"][0].tolist()
    assert labels[8] == -100 and labels[13] == -100  # no prediction across a boundary
    assert labels[3:8] == [7, 8, 9, 10, 11]


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma", "gpt2"])
def test_the_packed_loss_equals_the_padded_batchs(architecture):
    # Prepare: a random tiny model, the examples padded and packed
    model, _ = load_model(f"tiny-{architecture}")
    model.eval()
    # Execute
    with torch.no_grad():
        padded = float(response_loss(model, collate(EXAMPLES, 0)))
        packed = float(response_loss(model, pack(EXAMPLES)))
        leaky = pack(EXAMPLES)  # positions that do not restart: one long sequence
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
        crossed = float(response_loss(model, leaky))
    # Assert: equal within 1e-5; attention across examples would change it
    assert packed == pytest.approx(padded, abs=1e-5)
    assert abs(crossed - padded) > 1e-4


def test_packed_training_takes_the_same_steps(tiny_model, token_examples, tokenizer):
    # Prepare / Execute: the same examples and steps, padded and packed (fp32)
    runs = {}
    for packing in (False, True):
        model, _ = load_model("tiny-llama")
        config = TrainConfig(
            precision="fp32", lr=1e-2, batch_size=2, max_steps=3, lora_dropout=0.0, packing=packing
        )
        runs[packing] = train_client(
            model,
            token_examples,
            rank=4,
            alpha=8.0,
            seed=0,
            pad_id=int(tokenizer.pad_token_id),
            target_modules=["q_proj", "v_proj"],
            config=config,
        )
    # Assert: the same losses and factors to rounding; packing feeds no padding
    padded, packed = runs[False], runs[True]
    assert packed.loss_curve == pytest.approx(padded.loss_curve, abs=1e-5)
    for module, f in padded.factors.items():
        assert torch.allclose(f.B, packed.factors[module].B, atol=1e-5)
    assert packed.tokens == padded.tokens  # every packed token is real


def test_packing_is_refused_where_examples_must_stay_apart():
    with pytest.raises(FloraError, match="train.packing with train.loss_weighting = 'examples'"):
        TrainConfig(packing=True, loss_weighting="examples")
    with pytest.raises(FloraError, match="train.packing with privacy.mode = 'dp-sgd'"):
        load_config(
            "configs/tiny.toml",
            ["train.packing=true", "privacy.mode='dp-sgd'", "privacy.epsilon=8.0"],
        )


def test_dolly_packs_with_no_padding_where_batches_pad_a_quarter():
    # the padding share of Dolly's micro-batches (the study's settings: chat template, 128
    # tokens, batch 4): padded as today against packed
    from flora.data import encode_records, load_records
    from flora.data.batching import batches
    from flora.tiny_tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    records = load_records("dolly", limit=400)
    examples = encode_records(records, tokenizer, template="chat", max_length=128).examples
    padded = real = packed_slots = 0
    for batch in batches(examples, 4, seed=0, epoch=0):
        c, p = collate(batch, 0), pack(batch)
        padded += c["input_ids"].numel()
        real += int(c["attention_mask"].sum())
        packed_slots += p["input_ids"].numel()
    assert 1 - real / padded > 0.15  # today's batches
    assert 1 - real / packed_slots < 0.05  # packed: none at all
