"""A base held below fp32: bf16/fp16 weights with fp32 master copies of the target modules
(exact merges), fp16 training with a gradient scaler, and a bitsandbytes-quantised base."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flora import simulation
from flora.checkpoint import load_checkpoint
from flora.config import TrainConfig, load_config
from flora.errors import FloraError
from flora.factors import LoraFactors
from flora.models import load_model
from flora.protocol import RoundUpdate
from flora.training import evaluate_loss, train_client
from flora.weights import merge_update, module_weight, target_shapes

TARGETS = ["q_proj", "v_proj"]
FAST = [
    "train.max_steps=2",
    "train.batch_size=2",
    "eval.samples=0",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=48",
]


def _dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters()}


def _small_updates(model: torch.nn.Module, rounds: int, seed: int = 0) -> list[RoundUpdate]:
    """Rank-4 updates about 1e-3 of the weights' scale, as a few rounds of LoRA give."""
    generator = torch.Generator().manual_seed(seed)
    updates = []
    for t in range(rounds):
        factors = {}
        for name, (out, inp) in sorted(target_shapes(model, TARGETS).items()):
            a = torch.randn(4, inp, generator=generator) * 1e-2
            b = torch.randn(out, 4, generator=generator) * 1e-2
            factors[name] = LoraFactors(A=a, B=b, scaling=1.0)
        updates.append(RoundUpdate(round=t + 1, factors=factors))
    return updates


def _cumulative(model: torch.nn.Module, updates: list[RoundUpdate]) -> dict[str, torch.Tensor]:
    names = sorted(target_shapes(model, TARGETS))
    before = {m: module_weight(model, m).double().clone() for m in names}
    for update in updates:
        merge_update(model, update)
    return {m: module_weight(model, m).double() - before[m] for m in names}


# --- a bf16 base ------------------------------------------------------------------------------


def test_a_bf16_base_keeps_its_target_modules_in_fp32() -> None:
    model, _ = load_model("tiny-llama", dtype="bf16", precision="bf16", keep_fp32=TARGETS)
    dtypes = _dtypes(model)
    assert {d for n, d in dtypes.items() if n.rsplit(".", 2)[-2] in TARGETS} == {torch.float32}
    assert {d for n, d in dtypes.items() if n.rsplit(".", 2)[-2] not in TARGETS} == {torch.bfloat16}
    reference, _ = load_model("tiny-llama")  # the same seed: the masters are W0 exactly
    for name in target_shapes(model, TARGETS):
        assert torch.equal(module_weight(model, name), module_weight(reference, name))


def test_merges_into_the_fp32_masters_are_exact_and_into_bf16_weights_are_not() -> None:
    reference, _ = load_model("tiny-llama")
    updates = _small_updates(reference, rounds=10)
    exact = _cumulative(reference, updates)
    masters, _ = load_model("tiny-llama", dtype="bf16", precision="bf16", keep_fp32=TARGETS)
    plain, _ = load_model("tiny-llama", dtype="bf16", precision="bf16")

    def error(cumulative: dict[str, torch.Tensor]) -> float:
        num = sum(float((cumulative[m] - exact[m]).norm() ** 2) for m in exact)
        return (num / sum(float(u.norm() ** 2) for u in exact.values())) ** 0.5

    assert error(_cumulative(masters, updates)) == 0.0  # bitwise the fp32 base's sums
    assert error(_cumulative(plain, updates)) > 0.05  # bf16 rounds part of every update away


def test_a_run_on_a_bf16_base_holds_exactly_the_fp32_sum_of_its_updates(tmp_path: Path) -> None:
    overrides = [*FAST, "model.dtype='bf16'", "train.precision='bf16'", "federation.rounds=2"]
    run = simulation.run(load_config("configs/tiny.toml", overrides), tmp_path / "run", quiet=True)
    assert torch.isfinite(torch.tensor([run.loss_before, run.loss_after])).all()
    # the final model's target weights are W0 + each round's update, added in fp32
    replayed, _ = load_model("tiny-llama")
    for update in load_checkpoint(tmp_path / "run").history:
        merge_update(replayed, update)
    saved = load_file(tmp_path / "run" / "final" / "model" / "model.safetensors")
    for name in target_shapes(replayed, TARGETS):
        weight = saved[f"{name}.weight"]
        assert weight.dtype == torch.float32
        assert torch.equal(weight, module_weight(replayed, name))
    assert saved["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_without_exact_merge_the_targets_take_the_base_precision(tmp_path: Path) -> None:
    overrides = [
        *FAST,
        "model.dtype='bf16'",
        "train.precision='bf16'",
        "model.exact_merge=false",
        "federation.rounds=1",
    ]
    simulation.run(load_config("configs/tiny.toml", overrides), tmp_path / "run", quiet=True)
    saved = load_file(tmp_path / "run" / "final" / "model" / "model.safetensors")
    assert saved["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


# --- fp16 and the gradient scaler ---------------------------------------------------------------


def test_fp16_training_with_the_grad_scaler_follows_fp32(
    tiny_model, token_examples, torch_single_thread
) -> None:
    def train(precision: str) -> list[float]:
        config = TrainConfig(
            lr=1e-2, batch_size=2, max_steps=4, lora_dropout=0.0, precision=precision
        )
        result = train_client(
            tiny_model, token_examples, rank=4, alpha=8, config=config, seed=0, pad_id=0
        )
        assert all(f.B.abs().sum() > 0 for f in result.factors.values())  # it did train
        return result.loss_curve

    fp32, fp16 = train("fp32"), train("fp16")
    assert torch.allclose(torch.tensor(fp16), torch.tensor(fp32), atol=5e-3)
    assert fp16 != fp32  # fp16 did run in fp16


# --- a quantised base (bitsandbytes) ------------------------------------------------------------


@pytest.mark.parametrize(("bits", "layer"), [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_a_quantised_base_leaves_the_targets_in_fp32(bits: int, layer: str) -> None:
    model, _ = load_model(
        "tiny-llama", dtype="bf16", precision="bf16", quantization=bits, keep_fp32=TARGETS
    )
    attention = model.model.layers[0].self_attn
    assert type(attention.k_proj).__name__ == layer
    assert type(attention.q_proj) is torch.nn.Linear
    assert attention.q_proj.weight.dtype == torch.float32


def test_gradients_cross_4bit_layers_after_an_evaluation(token_examples) -> None:
    """Regression: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first no-grad
    forward into a layout without a backward; the first layer's LoRA then got no gradient."""
    model, _ = load_model(
        "tiny-llama", dtype="bf16", precision="bf16", quantization=4, keep_fp32=TARGETS
    )
    evaluate_loss(model, token_examples, batch_size=2, pad_id=0, precision="bf16")
    config = TrainConfig(lr=1e-2, batch_size=2, max_steps=2, lora_dropout=0.0, precision="bf16")
    result = train_client(model, token_examples, rank=4, alpha=8, config=config, seed=0, pad_id=0)
    first = result.factors["model.layers.0.self_attn.q_proj"]
    assert first.B.abs().sum() > 0  # the gradient reached layer 0 through 4-bit layers


def test_a_run_on_a_4bit_base_lowers_the_loss(tmp_path: Path) -> None:
    overrides = [
        *FAST,
        "model.quantization=4",
        "model.dtype='bf16'",
        "train.precision='bf16'",
        "train.max_steps=4",
        "federation.rounds=2",
    ]
    run = simulation.run(load_config("configs/tiny.toml", overrides), tmp_path / "run", quiet=True)
    assert run.loss_after < run.loss_before


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(FloraError, match=r"model.quantization = 4 needs bitsandbytes.*pip install"):
        load_model("tiny-llama", quantization=4, keep_fp32=TARGETS)


def test_an_unsupported_device_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes

    from flora.quantization import require_bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"}, raising=False)
    with pytest.raises(FloraError, match=r"runs on \['cuda'\], not on cpu"):
        require_bitsandbytes(torch.device("cpu"), 8)
