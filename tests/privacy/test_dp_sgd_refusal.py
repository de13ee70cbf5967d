"""flora.privacy.config.dp_sgd_refusal: the one statement of what DP-SGD refuses, which both the
config check and train_client raise word for word."""

from __future__ import annotations

import pytest

from flora.config import TrainConfig, load_config
from flora.errors import FloraError
from flora.privacy.config import dp_sgd_refusal
from flora.privacy.dp_sgd import DPSGD
from flora.training import train_client

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = "configs/tiny.toml"
DP_SGD = ['privacy.mode="dp-sgd"', "privacy.epsilon=8"]

REFUSED = [
    ({"sampling": "shuffle"}, "DP-SGD's accounting needs 'poisson'"),
    ({"loss_weighting": "tokens"}, "DP-SGD's accounting needs 'examples'"),
    ({"gradient_checkpointing": True}, "would see each recomputed forward twice"),
    ({"precision": "fp16"}, "DP-SGD does not train in fp16"),
]


@pytest.mark.parametrize(("train", "fragment"), REFUSED)
def test_each_refusal_names_the_key_and_the_fix(train, fragment) -> None:
    refusal = dp_sgd_refusal(TrainConfig(**train))
    key = next(iter(train))
    assert refusal is not None and fragment in refusal
    assert refusal.startswith(f"train.{key}") and "privacy.mode = 'dp-sgd'" in refusal


@pytest.mark.parametrize(
    ("train", "base_dtype"),
    [
        ({}, "fp32"),
        ({"sampling": "poisson", "loss_weighting": "examples"}, "fp32"),
        ({"precision": "bf16"}, "bf16"),
        ({"precision": "auto"}, "bf16"),
    ],
)
def test_what_dp_sgd_accepts(train, base_dtype) -> None:
    assert dp_sgd_refusal(TrainConfig(**train), base_dtype) is None


def test_auto_precision_on_an_fp16_base_is_fp16_and_refused() -> None:
    refusal = dp_sgd_refusal(TrainConfig(precision="auto"), "fp16")
    assert refusal is not None and refusal.startswith("model.dtype = 'fp16'")
    assert "does not train in fp16" in refusal
    with pytest.raises(FloraError, match=r"^model\.dtype = 'fp16' with privacy\.mode"):
        load_config(TINY, [*DP_SGD, "model.dtype='fp16'", "train.precision='auto'"])


@pytest.mark.parametrize(("train", "fragment"), REFUSED)
def test_the_config_and_train_client_raise_the_same_words(
    tiny_model, token_examples, tokenizer, train, fragment
) -> None:
    # Prepare
    ((key, value),) = train.items()
    override = f"train.{key}={value!r}".replace("True", "true")
    expected = dp_sgd_refusal(TrainConfig(**train))
    # Execute
    with pytest.raises(FloraError) as from_config:
        load_config(TINY, [*DP_SGD, override])
    with pytest.raises(FloraError) as from_training:
        train_client(
            tiny_model,
            token_examples,
            rank=4,
            alpha=8.0,
            seed=0,
            pad_id=tokenizer.pad_token_id,
            config=TrainConfig(batch_size=2, **train),
            privacy=DPSGD(1.0, 1.0, 2),
        )
    # Assert
    assert str(from_config.value) == str(from_training.value) == expected
