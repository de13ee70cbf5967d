"""Every run leaves a PEFT adapter: loaded onto the original base with PeftModel /
AutoPeftModelForCausalLM, it gives final/model's outputs (flora.export, outputs.save_final)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from flora import simulation
from flora.config import load_config
from flora.export import cumulative_adapter
from flora.factors import LoraFactors
from flora.protocol import RoundUpdate

TINY = "configs/tiny.toml"
FAST = [
    "train.max_steps=2",
    "eval.samples=0",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=64",
    "threads=1",
]


def _factors(rank: int, out: int = 6, inp: int = 5, scaling: float = 1.0) -> LoraFactors:
    return LoraFactors(torch.randn(rank, inp), torch.randn(out, rank), scaling)


@pytest.mark.parametrize("residual", [False, True])
def test_the_cumulative_update_is_exact(residual):
    torch.manual_seed(0)
    history = [
        RoundUpdate(t, {"m": _factors(r)}, {"m": torch.randn(6, 5)} if residual else None)
        for t, r in ((1, 2), (2, 3))
    ]
    lora = {"m": _factors(1, scaling=0.5)}
    (out,) = cumulative_adapter(history, lora).values()  # type: ignore[union-attr]
    want = sum(u.deltas()["m"] for u in history) + lora["m"].delta()
    torch.testing.assert_close(out.delta(), want, rtol=0, atol=1e-5)
    assert out.scaling == 1.0
    assert out.rank == 5  # min(6, 5): the sum is full rank, with or without the residual


def test_a_low_rank_sum_keeps_its_numerical_rank():
    torch.manual_seed(1)
    shared = _factors(2, out=40, inp=30)
    history = [RoundUpdate(t, {"m": shared}) for t in (1, 2, 3)]  # the same rank-2 update thrice
    (out,) = cumulative_adapter(history, None).values()  # type: ignore[union-attr]
    assert out.rank == 2
    torch.testing.assert_close(out.delta(), 3 * shared.delta(), rtol=0, atol=1e-4)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits


METHODS = [
    ("flora", [8, 4, 2]),
    ("fedex-lora", [4, 4, 4]),
    ("fedit", [4, 4, 4]),
    ("zero-padding", [8, 4, 2]),
]


@pytest.mark.parametrize(("method", "ranks"), METHODS)
def test_the_adapter_on_the_original_base_gives_the_final_model(
    tmp_path, monkeypatch, method, ranks
):
    run_dir = tmp_path / method
    config = load_config(TINY, [*FAST, f"federation.method='{method}'", f"lora.ranks={ranks}"])
    simulation.run(config, run_dir, quiet=True)
    adapter = run_dir / "final" / "adapter"
    declared = json.loads((adapter / "adapter_config.json").read_text())
    assert declared["base_model_name_or_path"] == "../base"  # travels with the run
    merged = _logits(AutoModelForCausalLM.from_pretrained(run_dir / "final" / "model"))
    base = AutoModelForCausalLM.from_pretrained(adapter / declared["base_model_name_or_path"])
    plain = _logits(base)
    loaded = _logits(PeftModel.from_pretrained(base, adapter))
    with monkeypatch.context() as patch:  # the relative base resolves from the adapter's folder
        patch.chdir(adapter)
        auto = _logits(AutoPeftModelForCausalLM.from_pretrained("."))
    assert (merged - plain).abs().max() > 1e-4  # the run changed the model
    torch.testing.assert_close(loaded, merged, rtol=0, atol=2e-5)
    torch.testing.assert_close(auto, merged, rtol=0, atol=2e-5)


def test_final_model_is_optional(tmp_path):
    config = load_config(TINY, [*FAST, "output.model=false", "federation.rounds=1"])
    simulation.run(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "final" / "model").exists()
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_moved_run_loads_with_the_same_logits_and_carries_its_card(tmp_path, capsys):
    # Prepare: a finished run, then moved (the old place gone)
    config = load_config(TINY, [*FAST, "federation.rounds=1"])
    simulation.run(config, tmp_path / "here", quiet=True)
    want = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "here" / "final" / "model"))
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    (tmp_path / "here").rename(moved)
    # Execute: the adapter onto the base that travelled with it
    adapter = moved / "final" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(moved / "final" / "base")
    got = _logits(PeftModel.from_pretrained(base, adapter))
    # Assert: the same logits; the model card names base, method, clients and the command
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "- flora" in card
    for fact in ("| method | `flora`", "ranks [8, 4, 2]", "held-out loss", "flora run run.toml"):
        assert fact in card, fact
    assert "[federation]" in card and 'method = "flora"' in card


def test_eval_takes_a_base_for_a_runs_adapter(tmp_path, capsys):
    from flora.cli import main

    config = load_config(TINY, [*FAST, "federation.rounds=1", "output.model=false"])
    simulation.run(config, tmp_path / "run", quiet=True)
    base = tmp_path / "run" / "final" / "base"
    args = ["eval", str(tmp_path / "run"), "--tasks", "heldout", "--base", str(base), "--quiet"]
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    loss = report["results"]["flora_heldout"]["loss,none"]
    assert loss == pytest.approx(summary["loss_after"], abs=1e-5)  # the run's own final loss
    assert main(["eval", "tiny-llama", "--base", str(base)]) == 2
    assert "applies to a run directory" in capsys.readouterr().err


def test_flora_export_names_the_given_base_and_writes_the_merged_model(tmp_path, capsys):
    from flora.cli import main

    # Prepare: a finished run, and a copy of its base somewhere else (as on another machine)
    config = load_config(TINY, [*FAST, "federation.rounds=1"])
    simulation.run(config, tmp_path / "run", quiet=True)
    want = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model"))
    copy = tmp_path / "models" / "tiny-base"
    shutil.copytree(tmp_path / "run" / "final" / "base", copy)
    out = tmp_path / "export"
    # Execute
    code = main(
        ["export", str(tmp_path / "run"), "--out", str(out), "--base", str(copy), "--merged"]
    )
    # Assert: the adapter names the copy and loads from the export alone, the merged
    # checkpoint gives the same logits, the card travels with it
    assert code == 0
    declared = json.loads((out / "adapter_config.json").read_text())
    assert declared["base_model_name_or_path"] == str(copy.resolve())
    torch.testing.assert_close(
        _logits(AutoPeftModelForCausalLM.from_pretrained(out)), want, rtol=0, atol=2e-5
    )
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(_logits(merged), want, rtol=0, atol=2e-5)
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: peft\n")
    assert not list(tmp_path.glob(".export.tmp-*"))
    # an export never overwrites another, and a run without an adapter is one line
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "exists and is not empty" in err[0] and "no final/adapter to export" in err[1]


def test_flora_export_without_a_base_makes_the_runs_own_absolute(tmp_path):
    from flora.export_run import export_run

    config = load_config(TINY, [*FAST, "federation.rounds=1", "output.model=false"])
    simulation.run(config, tmp_path / "run", quiet=True)
    base = export_run(tmp_path / "run", tmp_path / "out")
    assert base == str((tmp_path / "run" / "final" / "base").resolve())  # was "../base"
    assert PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "out")
