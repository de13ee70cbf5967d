"""flora.privacy.dp_sgd in local training: opacus' per-example clipping and noise on the LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, LoraModel

from flora.data.batching import collate
from flora.errors import FloraError
from flora.loss import response_losses
from flora.privacy.dp_sgd import DPSGD, private_optimizer
from flora.training import TrainConfig, train_client

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _lora_params(model) -> list[torch.nn.Parameter]:
    """A rank-4 LoRA on q, v with random B (PEFT's zero B would give A no gradient)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    LoraModel(model, config, "dp")
    generator = torch.Generator().manual_seed(3)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return params


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _per_example_gradients(model, params, examples, pad_id) -> list[torch.Tensor]:
    grads = []
    for example in examples:
        model.zero_grad(set_to_none=True)
        response_losses(model, collate([example], pad_id)).sum().backward()
        grads.append(_flat([p.grad for p in params]).clone())
    model.zero_grad(set_to_none=True)
    return grads


def _private_step(model, params, examples, pad_id, privacy, micro: int):
    """One DP step over ``examples`` in micro-batches of ``micro``; returns the applied gradient
    (SGD at lr 1: the parameters' change)."""
    before = _flat(params).detach().clone()
    optimizer = torch.optim.SGD(params, lr=1.0)
    with private_optimizer(model, optimizer, privacy, seed=11) as dp:
        chunks = [examples[i : i + micro] for i in range(0, len(examples), micro)]
        for i, chunk in enumerate(chunks):
            response_losses(model, collate(chunk, pad_id)).sum().backward()
            if i < len(chunks) - 1:
                dp.signal_skip_step(True)
                dp.step()
                dp.zero_grad(set_to_none=True)
        dp.step()
        dp.zero_grad(set_to_none=True)
    return before - _flat(params).detach()


@pytest.mark.parametrize("micro", [4, 1])  # one micro-batch, or one per example (accumulated)
def test_every_examples_gradient_is_clipped_before_the_sum(
    tiny_model, token_examples, tokenizer, micro
):
    pad = tokenizer.pad_token_id
    params = _lora_params(tiny_model)
    grads = _per_example_gradients(tiny_model, params, token_examples, pad)
    norms = torch.stack([g.norm() for g in grads])
    bound = float(norms.median())  # some examples above the bound, some below
    assert (norms > bound).any() and (norms < bound).any()
    clipped = [g * min(1.0, bound / float(g.norm())) for g in grads]
    assert all(float(c.norm()) <= bound * (1 + 1e-6) for c in clipped)
    expected = torch.stack(clipped).sum(0) / len(token_examples)
    applied = _private_step(
        tiny_model, params, token_examples, pad, DPSGD(0.0, bound, len(token_examples)), micro
    )
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-6)
    unclipped = torch.stack(grads).sum(0) / len(token_examples)
    assert not torch.allclose(applied, unclipped, rtol=1e-3)  # the bound did bind


def test_the_noise_has_the_configured_standard_deviation(tiny_model, token_examples, tokenizer):
    pad = tokenizer.pad_token_id
    params = _lora_params(tiny_model)
    state = [p.detach().clone() for p in params]
    bound, sigma, expected_batch = 0.05, 2.0, 4
    quiet = _private_step(
        tiny_model, params, token_examples, pad, DPSGD(0.0, bound, expected_batch), 4
    )
    with torch.no_grad():
        for p, s in zip(params, state, strict=True):
            p.copy_(s)
    noisy_dp = DPSGD(sigma, bound, expected_batch, reproducible_noise=True)
    noisy = _private_step(tiny_model, params, token_examples, pad, noisy_dp, 4)
    z = (noisy - quiet) * expected_batch / (sigma * bound)  # should be N(0, 1) per coordinate
    assert z.numel() > 1500
    assert abs(float(z.mean())) < 0.1 and 0.93 < float(z.std()) < 1.07


def test_the_hooks_come_off_and_the_base_is_bitwise_as_before(
    tiny_model, token_examples, tokenizer
):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    train_client(
        tiny_model,
        token_examples,
        rank=4,
        alpha=8.0,
        seed=0,
        pad_id=tokenizer.pad_token_id,
        config=TrainConfig(precision="fp32", batch_size=2, max_steps=3),
        privacy=DPSGD(1.0, 0.5, 2),
    )
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for module in tiny_model.modules():
        assert not module._forward_hooks and not module._backward_hooks
        assert not hasattr(module, "activations")
    assert not any(
        hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in tiny_model.parameters()
    )
    assert not hasattr(tiny_model, "autograd_grad_sample_hooks")


def _factors(model, examples, pad, privacy=None, target_modules=("q_proj", "v_proj"), **train):
    config = TrainConfig(
        **{
            "lr": 1e-2,
            "precision": "fp32",
            "batch_size": 2,
            "max_steps": 5,
            "lora_dropout": 0.0,
            **train,
        }
    )
    return train_client(
        model,
        examples,
        rank=4,
        alpha=8.0,
        seed=7,
        pad_id=pad,
        config=config,
        privacy=privacy,
        target_modules=target_modules,
    ).factors


def test_no_noise_and_an_unbounded_clip_reproduce_the_non_private_run(
    tiny_model, tokenizer, token_examples
):
    pad = tokenizer.pad_token_id
    examples = token_examples * 3  # 12 examples: Poisson samples of expected size 2
    private = _factors(tiny_model, examples, pad, DPSGD(0.0, 1e30, 2))
    plain = _factors(
        tiny_model, examples, pad, sampling="poisson", loss_weighting="examples", max_grad_norm=0.0
    )
    for module in plain:
        torch.testing.assert_close(private[module].A, plain[module].A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(private[module].B, plain[module].B, rtol=1e-5, atol=1e-6)
    shuffled = _factors(tiny_model, examples, pad, max_grad_norm=0.0)
    assert not torch.allclose(shuffled[module].B, plain[module].B)  # the sampling does matter


def test_micro_batches_accumulate_to_the_same_private_step(tiny_model, tokenizer, token_examples):
    pad = tokenizer.pad_token_id
    examples = token_examples * 3
    privacy = DPSGD(0.8, 0.3, 4, reproducible_noise=True)
    whole = _factors(tiny_model, examples, pad, privacy, batch_size=4)
    split = _factors(tiny_model, examples, pad, privacy, batch_size=1, grad_accum=4)
    for module in whole:
        torch.testing.assert_close(whole[module].B, split[module].B, rtol=1e-4, atol=1e-6)


def test_secret_noise_differs_between_equal_calls_and_reproducible_noise_does_not(
    tiny_model, tokenizer, token_examples
):
    pad = tokenizer.pad_token_id
    examples = token_examples * 3
    secret = [_factors(tiny_model, examples, pad, DPSGD(1.0, 0.3, 2)) for _ in range(2)]
    seeded = [_factors(tiny_model, examples, pad, DPSGD(1.0, 0.3, 2, True)) for _ in range(2)]
    module = next(iter(secret[0]))
    assert not torch.equal(secret[0][module].B, secret[1][module].B)
    assert torch.equal(seeded[0][module].B, seeded[1][module].B)


def test_dp_sgd_refuses_fp16_and_gradient_checkpointing(tiny_model, tokenizer, token_examples):
    pad = tokenizer.pad_token_id
    with pytest.raises(FloraError, match="does not train in fp16"):
        _factors(tiny_model, token_examples, pad, DPSGD(1.0, 1.0, 2), precision="fp16")
    with pytest.raises(FloraError, match="gradient_checkpointing"):
        _factors(tiny_model, token_examples, pad, DPSGD(1.0, 1.0, 2), gradient_checkpointing=True)


@pytest.mark.parametrize(
    ("architecture", "targets"), [("gpt2", ["c_attn"]), ("gemma", ["q_proj", "v_proj"])]
)
def test_dp_sgd_on_architectures_whose_loss_takes_the_models_own_forward(
    tokenizer, token_examples, architecture, targets
):
    # GPT-2 (Conv1D, weight (in, out)) and Gemma (soft-capped logits) take the model's own
    # forward in response_losses; the clip and the per-example gradients must hold there too
    from flora.models import tiny_model

    pad = tokenizer.pad_token_id
    examples = token_examples * 3
    runs = []
    for privacy, extra in (
        (DPSGD(0.0, 1e30, 2), {}),
        (None, {"sampling": "poisson", "loss_weighting": "examples", "max_grad_norm": 0.0}),
    ):
        model = tiny_model(architecture, tokenizer, seed=0)
        runs.append(_factors(model, examples, pad, privacy, target_modules=targets, **extra))
    private, plain = runs
    for module in plain:
        torch.testing.assert_close(private[module].B, plain[module].B, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(private[module].A, plain[module].A, rtol=1e-5, atol=1e-6)


def test_per_example_norms_are_fp32_under_bf16_training(tiny_model, token_examples, tokenizer):
    """With bf16 autocast, opacus would compute each example's gradient (and so its norm and
    clip factor) in bf16; flora's samplers compute them in fp32, so no clipped example exceeds
    the bound by more than fp32 rounding."""
    # Prepare: a bound below every example's norm, so every example is clipped
    pad = tokenizer.pad_token_id
    params = _lora_params(tiny_model)
    norms = [
        float(g.norm()) for g in _per_example_gradients(tiny_model, params, token_examples, pad)
    ]
    bound = min(norms) / 3
    optimizer = torch.optim.SGD(params, lr=0.0)
    # Execute: one bf16 micro-batch through the private optimizer's hooks and clipping
    with private_optimizer(tiny_model, optimizer, DPSGD(0.0, bound, 4), seed=0) as dp:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = response_losses(tiny_model, collate(token_examples, pad))
        losses.sum().backward()
        samples = [p.grad_sample for p in params]
        dp.pre_step()  # clip each example and sum, as the step does
        # Assert: fp32 per-example gradients; every clipped one within the bound to fp32 rounding
        assert all(s.dtype == torch.float32 for s in samples)
        per_example = torch.cat([s.reshape(len(token_examples), -1) for s in samples], dim=1)
        factors = (bound / (per_example.norm(dim=1) + 1e-6)).clamp(max=1.0)
        clipped = (per_example * factors[:, None]).norm(dim=1)
        assert float(clipped.max()) <= bound * (1 + 1e-6)
        dp.zero_grad(set_to_none=True)
