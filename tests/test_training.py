"""flora.training: one client's LoRA round on the shared model, held-out loss, dense merges."""

from __future__ import annotations

import math

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from flora.errors import FloraError
from flora.factors import LoraFactors
from flora.training import TrainConfig, evaluate_loss, train_client
from flora.weights import merge_into_base

pytestmark = pytest.mark.usefixtures("torch_single_thread")

HIDDEN, KV = 64, 32  # tiny-llama: q_proj (64, 64), v_proj (32, 64) with 2 of 4 heads for k/v


def _train(model, examples, pad_id, **overrides):
    """train_client with small defaults; config fields and call arguments both overridable."""
    fields = set(TrainConfig.__dataclass_fields__)
    config = {"lr": 1e-2, "batch_size": 2, "max_steps": 3, "lora_dropout": 0.0, "precision": "fp32"}
    config.update({k: v for k, v in overrides.items() if k in fields})
    kwargs = {"rank": 4, "alpha": 8.0, "seed": 0, "pad_id": pad_id}
    kwargs.update({k: v for k, v in overrides.items() if k not in fields})
    return train_client(model, examples, config=TrainConfig(**config), **kwargs)


def _equal_factors(a, b) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].A, b[k].A) and torch.equal(a[k].B, b[k].B) and a[k].scaling == b[k].scaling
        for k in a
    )


def _random_init(rank: int, scaling: float, seed: int = 5) -> dict[str, LoraFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.{proj}": LoraFactors(
            torch.randn(rank, HIDDEN, generator=gen), torch.randn(out, rank, generator=gen), scaling
        )
        for i in range(2)
        for proj, out in (("q_proj", HIDDEN), ("v_proj", KV))
    }


# --- learning, determinism, no side effects ---------------------------------------------------


def test_loss_goes_down_on_a_repeated_batch(tiny_model, token_examples, tokenizer) -> None:
    result = _train(
        tiny_model,
        token_examples[:2],
        tokenizer.pad_token_id,
        lr=5e-2,
        max_steps=12,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    )
    curve = result.loss_curve
    assert result.steps == len(curve) == 12
    assert curve[-1] < curve[0] - 0.3
    assert result.train_loss == pytest.approx(sum(curve) / 12)


def test_same_seed_gives_bitwise_identical_factors(tiny_model, token_examples, tokenizer) -> None:
    pad = tokenizer.pad_token_id
    options = {"lora_dropout": 0.1, "max_steps": 2, "batch_size": 2}
    first = _train(tiny_model, token_examples, pad, **options)
    second = _train(tiny_model, token_examples, pad, **options)
    other = _train(tiny_model, token_examples, pad, seed=1, **options)
    assert _equal_factors(first.factors, second.factors)
    assert first.loss_curve == second.loss_curve
    assert not _equal_factors(first.factors, other.factors)


def test_length_grouped_training_is_seeded_and_feeds_the_same_tokens(
    tiny_model, token_examples, tokenizer
) -> None:
    pad = tokenizer.pad_token_id
    options = {"max_steps": 0, "local_epochs": 1.0, "batch_size": 2}
    grouped = _train(tiny_model, token_examples, pad, group_by_length=True, **options)
    again = _train(tiny_model, token_examples, pad, group_by_length=True, **options)
    plain = _train(tiny_model, token_examples, pad, **options)
    assert _equal_factors(grouped.factors, again.factors)
    assert grouped.tokens == plain.tokens and grouped.steps == plain.steps  # one epoch: all
    assert not _equal_factors(grouped.factors, plain.factors)  # another batch order


def test_base_model_is_untouched(tiny_model, token_examples, tokenizer) -> None:
    # Prepare
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    grad_flags = {k: p.requires_grad for k, p in tiny_model.named_parameters()}
    tiny_model.eval()
    # Execute
    _train(tiny_model, token_examples, tokenizer.pad_token_id, lr=0.1, trains={"A", "B"})
    # Assert
    after = tiny_model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, BaseTunerLayer) for m in tiny_model.modules())
    assert not hasattr(tiny_model, "peft_config")
    assert {k: p.requires_grad for k, p in tiny_model.named_parameters()} == grad_flags
    assert not tiny_model.training


def test_model_is_cleaned_up_after_an_error(tiny_model, token_examples, tokenizer) -> None:
    with pytest.raises(FloraError, match="rank 4"):
        _train(tiny_model, token_examples, tokenizer.pad_token_id, init=_random_init(3, 2.0))
    assert not any(isinstance(m, BaseTunerLayer) for m in tiny_model.modules())
    _train(tiny_model, token_examples, tokenizer.pad_token_id, max_steps=1)  # injects cleanly


# --- factors, init, frozen A ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "alpha", "rslora", "scaling"),
    [(4, 8.0, False, 2.0), (2, 16.0, False, 8.0), (4, 8.0, True, 4.0), (9, 6.0, True, 2.0)],
)
def test_factor_shapes_and_scaling(
    tiny_model, token_examples, tokenizer, rank, alpha, rslora, scaling
) -> None:
    result = _train(
        tiny_model,
        token_examples,
        tokenizer.pad_token_id,
        rank=rank,
        alpha=alpha,
        use_rslora=rslora,
        max_steps=1,
    )
    assert sorted(result.factors) == sorted(_random_init(rank, 1.0))
    for name, factors in result.factors.items():
        out = HIDDEN if name.endswith("q_proj") else KV
        assert factors.A.shape == (rank, HIDDEN) and factors.B.shape == (out, rank)
        assert factors.A.dtype == factors.B.dtype == torch.float32
        assert not factors.A.requires_grad and factors.A.device.type == "cpu"
        assert factors.scaling == pytest.approx(scaling)


@pytest.mark.parametrize("overrides", [{"lr": 0.0, "max_steps": 3}, {"local_epochs": 0}])
def test_init_is_returned_when_nothing_trains(
    tiny_model, token_examples, tokenizer, overrides
) -> None:
    init = _random_init(4, 2.0)  # alpha 8 / r 4: the client's own scaling
    if "local_epochs" in overrides:
        overrides = {**overrides, "max_steps": 0}
    result = _train(tiny_model, token_examples, tokenizer.pad_token_id, init=init, **overrides)
    assert _equal_factors(result.factors, init)


def test_zero_steps_reports_no_loss(tiny_model, token_examples, tokenizer) -> None:
    result = _train(tiny_model, token_examples, tokenizer.pad_token_id, max_steps=0, local_epochs=0)
    assert result.steps == 0 and result.tokens == 0 and math.isnan(result.train_loss)


def test_init_at_another_scaling_keeps_the_update(tiny_model, token_examples, tokenizer) -> None:
    init = _random_init(4, 1.0)
    result = _train(tiny_model, token_examples, tokenizer.pad_token_id, init=init, lr=0.0)
    for name, factors in result.factors.items():
        assert factors.scaling == 2.0
        assert torch.allclose(factors.delta(), init[name].delta(), atol=1e-6)


def test_freeze_a_keeps_a_and_trains_b(tiny_model, token_examples, tokenizer) -> None:
    init = _random_init(4, 2.0)
    result = _train(tiny_model, token_examples, tokenizer.pad_token_id, init=init, trains={"B"})
    for name, factors in result.factors.items():
        assert torch.equal(factors.A, init[name].A)
        assert not torch.equal(factors.B, init[name].B)


def test_freeze_a_without_init_keeps_the_seeded_peft_a(
    tiny_model, token_examples, tokenizer
) -> None:
    pad = tokenizer.pad_token_id
    untrained = _train(tiny_model, token_examples, pad, lr=0.0, seed=3)
    frozen = _train(tiny_model, token_examples, pad, trains={"B"}, seed=3)
    for name, factors in frozen.factors.items():
        assert torch.equal(factors.A, untrained.factors[name].A)
        assert torch.count_nonzero(untrained.factors[name].B) == 0  # PEFT starts B at zero
        assert torch.count_nonzero(factors.B) > 0


@pytest.mark.parametrize(
    ("init", "message"),
    [
        (_random_init(3, 2.0), r"init module 'model\.layers\.0\.self_attn\.q_proj'.*rank 4"),
        (dict(list(_random_init(4, 2.0).items())[:3]), r"missing \['model\.layers\.1"),
    ],
)
def test_bad_init_is_refused(tiny_model, token_examples, tokenizer, init, message) -> None:
    with pytest.raises(FloraError, match=message):
        _train(tiny_model, token_examples, tokenizer.pad_token_id, init=init)


# --- steps, accumulation, precision -----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        ({"local_epochs": 1, "batch_size": 2}, 2),
        ({"local_epochs": 1.5, "batch_size": 1}, 6),
        ({"local_epochs": 2, "batch_size": 1, "grad_accum": 3}, 3),
        ({"local_epochs": 5, "max_steps": 2}, 2),
    ],
)
def test_step_count(tiny_model, token_examples, tokenizer, overrides, steps) -> None:
    overrides = {"max_steps": 0, **overrides}
    result = _train(tiny_model, token_examples, tokenizer.pad_token_id, **overrides)
    assert result.steps == steps
    assert result.examples == 4


def test_grad_accum_equals_one_big_batch(tiny_model, token_examples, tokenizer) -> None:
    """Micro-batch losses are weighted by response tokens, so 2x2 accumulated == one batch of 4."""
    pad = tokenizer.pad_token_id
    big = _train(tiny_model, token_examples, pad, batch_size=4, max_steps=2)
    accumulated = _train(tiny_model, token_examples, pad, batch_size=2, grad_accum=2, max_steps=2)
    assert accumulated.loss_curve == pytest.approx(big.loss_curve, abs=1e-5)
    assert big.tokens == accumulated.tokens == 2 * 26
    for name, factors in big.factors.items():
        assert torch.allclose(factors.B, accumulated.factors[name].B, atol=1e-5)


def test_bf16_precision_trains(tiny_model, token_examples, tokenizer) -> None:
    result = _train(tiny_model, token_examples, tokenizer.pad_token_id, precision="bf16")
    assert all(math.isfinite(x) for x in result.loss_curve)
    assert all(f.B.dtype == torch.float32 for f in result.factors.values())


def test_progress_bar_runs(tiny_model, token_examples, tokenizer) -> None:
    result = _train(tiny_model, token_examples, tokenizer.pad_token_id, progress=True)
    assert result.steps == 3 and result.seconds > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", -1.0),
        ("lr", math.nan),
        ("batch_size", 0),
        ("grad_accum", 1.5),
        ("local_epochs", -0.5),
        ("max_steps", -1),
        ("warmup_ratio", 1.0),
        ("schedule", "step"),
        ("max_grad_norm", -1.0),
        ("weight_decay", -0.1),
        ("lora_dropout", 1.0),
        ("precision", "half"),
        ("device", "gpu"),
    ],
)
def test_train_config_names_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(FloraError, match=rf"train\.{field} must be"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be"),
        ({"alpha": 0.0}, "alpha must be"),
        ({"target_modules": []}, "target_modules is empty"),
    ],
)
def test_bad_lora_arguments(tiny_model, token_examples, tokenizer, kwargs, message) -> None:
    with pytest.raises(FloraError, match=message):
        _train(tiny_model, token_examples, tokenizer.pad_token_id, **kwargs)


def test_no_examples_is_refused(tiny_model, tokenizer) -> None:
    with pytest.raises(FloraError, match="no examples"):
        _train(tiny_model, [], tokenizer.pad_token_id)


# --- evaluation -------------------------------------------------------------------------------


def test_evaluate_loss_is_the_masked_token_mean(tiny_model, token_examples, tokenizer) -> None:
    # Prepare: per-example log-likelihoods, without padding
    losses = []
    with torch.no_grad():
        for example in token_examples:
            ids = torch.tensor([example["input_ids"]])
            logp = torch.log_softmax(tiny_model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = torch.tensor(example["labels"][1:])
            keep = targets != -100
            losses.append(-logp[keep].gather(1, targets[keep, None]).squeeze(1))
    expected = torch.cat(losses).mean().item()
    tiny_model.train()
    # Execute: padded batches of 3 and 1
    loss = evaluate_loss(tiny_model, token_examples, batch_size=3, pad_id=tokenizer.pad_token_id)
    # Assert
    assert loss == pytest.approx(expected, abs=1e-5)
    assert tiny_model.training  # mode restored


def test_evaluate_loss_refuses_prompt_only_examples(tiny_model, tokenizer) -> None:
    example = {"input_ids": [1, 2, 3], "labels": [-100, -100, -100], "category": "all"}
    with pytest.raises(FloraError, match="no example has a response token"):
        evaluate_loss(tiny_model, [example], batch_size=1, pad_id=tokenizer.pad_token_id)


# --- merging ----------------------------------------------------------------------------------


def test_merge_into_base_adds_the_delta(tiny_model) -> None:
    name = "model.layers.1.self_attn.v_proj"
    weight = tiny_model.get_submodule(name).weight
    before = weight.detach().clone()
    delta = torch.randn(KV, HIDDEN, generator=torch.Generator().manual_seed(0))
    merge_into_base(tiny_model, {name: delta})
    assert torch.equal(weight, before + delta)


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        (
            {"model.layers.0.self_attn.q_proj": torch.zeros(HIDDEN, KV)},
            r"is \(64, 32\).*\(64, 64\)",
        ),
        ({"model.layers.7.self_attn.q_proj": torch.zeros(HIDDEN, HIDDEN)}, "no module"),
        ({"model.layers.0.self_attn.q_proj": torch.full((HIDDEN, HIDDEN), math.inf)}, "NaN or inf"),
    ],
)
def test_merge_into_base_checks_before_writing(tiny_model, delta, message) -> None:
    good = {"model.layers.0.self_attn.v_proj": torch.ones(KV, HIDDEN)}
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(FloraError, match=message):
        merge_into_base(tiny_model, {**good, **delta})
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


# --- the real SmolLM2 -------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_round_trip_leaves_the_base_untouched(token_examples) -> None:
    from flora.models import load_model

    model, tok = load_model("smollm2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _train(model, token_examples, tok.pad_token_id, rank=8, alpha=16.0, max_steps=2)
    assert len(result.factors) == 60  # 30 layers x (q_proj, v_proj)
    q = result.factors["model.layers.0.self_attn.q_proj"]
    v = result.factors["model.layers.0.self_attn.v_proj"]
    assert (q.A.shape, q.B.shape, v.B.shape) == ((8, 576), (576, 8), (192, 8))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_loss_and_factors(
    tiny_model, token_examples, tokenizer, dropout
) -> None:
    """Recomputed activations, the same numbers: the loss curve to 1e-5 and the factors close
    (dropout included: checkpointing replays the RNG); the shared model is left without it."""
    pad = tokenizer.pad_token_id

    def train_counting_saved(on: bool):  # (result, tensors kept for the backward)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            result = _train(
                tiny_model, token_examples, pad, lora_dropout=dropout, gradient_checkpointing=on
            )
        return result, len(saved)

    plain, saved_plain = train_counting_saved(False)
    checkpointed, saved_checkpointed = train_counting_saved(True)
    assert saved_checkpointed < saved_plain / 2  # the layers' activations were not kept
    assert checkpointed.loss_curve == pytest.approx(plain.loss_curve, rel=1e-5)
    for name, factors in plain.factors.items():
        torch.testing.assert_close(checkpointed.factors[name].B, factors.B, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(checkpointed.factors[name].A, factors.A, rtol=1e-4, atol=1e-6)
    assert not tiny_model.model.gradient_checkpointing


def test_training_reports_its_peak_memory(tiny_model, token_examples, tokenizer) -> None:
    result = _train(tiny_model, token_examples, tokenizer.pad_token_id)
    assert result.peak_rss_mib is not None and result.peak_rss_mib > 10  # python + torch + model
    assert result.peak_cuda_mib is None  # no CUDA here
