"""flora.optim: the optimiser and lr-schedule tables behind train.optimizer and train.schedule."""

from __future__ import annotations

import math

import pytest
import torch

from flora.errors import FloraError
from flora.optim import OPTIMIZERS, SCHEDULES, lr_factor, make_optimizer, make_scheduler
from flora.training import TrainConfig, train_client

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _steps(name: str, steps: int = 3) -> torch.Tensor:
    """``steps`` steps of optimiser ``name`` on a fixed quadratic; the parameter after them."""
    param = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12).reshape(3, 4))
    optimizer = make_optimizer(
        [param], TrainConfig(precision="fp32", optimizer=name, lr=0.1, weight_decay=0.01)
    )
    for _ in range(steps):
        (param**2).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return param.detach()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds_and_steps_downhill(name: str) -> None:
    # Prepare
    before = torch.linspace(-1.0, 1.0, 12).reshape(3, 4)
    # Execute
    after = _steps(name)
    # Assert
    assert torch.isfinite(after).all()
    assert (after**2).sum() < (before**2).sum()


def test_fused_adamw_is_adamw_within_float_tolerance() -> None:
    # torch 2.13 runs fused AdamW on the CPU too; it rounds its fused arithmetic differently
    torch.testing.assert_close(_steps("adamw-fused", 5), _steps("adamw", 5), rtol=1e-6, atol=1e-7)


def test_fused_adamw_trains_a_client_like_adamw(tiny_model, token_examples, tokenizer) -> None:
    def factors(name: str):
        config = TrainConfig(
            precision="fp32", lr=1e-2, batch_size=2, max_steps=3, lora_dropout=0.0, optimizer=name
        )
        result = train_client(
            tiny_model,
            token_examples,
            rank=4,
            alpha=8.0,
            config=config,
            seed=0,
            pad_id=tokenizer.pad_token_id,
        )
        return result.factors

    plain, fused = factors("adamw"), factors("adamw-fused")
    for module in plain:
        torch.testing.assert_close(fused[module].A, plain[module].A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused[module].B, plain[module].B, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("field", "value", "names"),
    [
        ("optimizer", "lion", "('adamw', 'adamw-fused', 'sgd')"),
        ("schedule", "step", "('linear', 'cosine', 'constant')"),
    ],
)
def test_an_unknown_name_is_one_line_naming_the_field_and_the_choices(field, value, names) -> None:
    with pytest.raises(FloraError) as error:
        TrainConfig(**{field: value})
    assert str(error.value) == f"train.{field} must be one of {names}, got {value!r}"


# --- schedules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "decayed"),
    [
        ("linear", [1.0, 0.5, 0.125]),
        ("cosine", [1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 7 / 8))]),
        ("constant", [1.0, 1.0, 1.0]),
    ],
)
def test_each_schedule_warms_up_then_decays(schedule: str, decayed: list[float]) -> None:
    # 10 steps, warmup 0.2: steps 0 and 1 ramp up; steps 2, 6, 9 are 0, 4/8, 7/8 into the decay
    factor = lr_factor(10, 0.2, schedule)
    assert [factor(0), factor(1)] == pytest.approx([1 / 3, 2 / 3])
    assert [factor(2), factor(6), factor(9)] == pytest.approx(decayed)
    assert all(factor(step) > 0 for step in range(10))  # no step gets lr 0


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_the_scheduler_sets_the_optimizers_lr(schedule: str) -> None:
    config = TrainConfig(precision="fp32", lr=0.5, warmup_ratio=0.0, schedule=schedule)
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], config)
    scheduler = make_scheduler(optimizer, config, total=4)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5 * lr_factor(4, 0.0, schedule)(s) for s in range(4)])
