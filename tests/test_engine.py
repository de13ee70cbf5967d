"""The embedded runtime on the tiny random Llama: files, loss, resume, catch-up, memory."""

from __future__ import annotations

import gc
import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import flora.client
import flora.simulation as simulation
from flora.cli import main
from flora.config import load_config
from flora.metrics import read_metrics

TINY = "configs/tiny.toml"


def _rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["run", TINY, "--out", str(run_dir), "--quiet"]) == 0
    return run_dir


def test_cli_run_writes_every_output_and_lowers_the_loss(tiny_run):
    for name in ("config.json", "metrics.jsonl", "summary.json", "final/model/config.json"):
        assert (tiny_run / name).exists(), name
    assert (tiny_run / "checkpoints" / "round_0002" / "state.json").is_file()
    versions = json.loads((tiny_run / "summary.json").read_text())["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"]  # what it ran on
    assert versions["flora-lora"] == importlib.metadata.version("flora-lora")  # not null
    before, after = (r["heldout_loss"] for r in _rows(tiny_run, "eval"))
    assert after < before
    clients = _rows(tiny_run, "client")
    assert len(clients) == 6
    for row in clients:
        for key in (
            "round",
            "client",
            "train_loss",
            "examples",
            "tokens",
            "seconds",
            "bytes_up",
            "bytes_down",
        ):
            assert key in row
    servers = _rows(tiny_run, "server")
    assert [r["round"] for r in servers] == [1, 2]
    assert all(r["noise"] < 1e-5 for r in servers)  # flora is exact
    assert servers[0]["global_rank"] == 8 + 4 + 2
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "final" / "model")
    assert model.config.num_hidden_layers == 2


def test_resume_gives_the_same_result_bitwise(tiny_run, tmp_path):
    # Prepare: the same run, cut back to its round-1 checkpoint as if it had crashed in round 2
    crashed = tmp_path / "crashed"
    shutil.copytree(tiny_run, crashed)
    shutil.rmtree(crashed / "checkpoints" / "round_0002")
    shutil.rmtree(crashed / "final")
    # Execute
    assert main(["run", "--resume", str(crashed), "--quiet"]) == 0
    # Assert
    expected, actual = _weights(tiny_run), _weights(crashed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert [r["round"] for r in _rows(crashed, "server")] == [1, 2]


@pytest.mark.parametrize("catch_up", ["replay", "svd"])
def test_partial_participation_keeps_every_base_equal_to_the_server(tmp_path, catch_up):
    overrides = [
        "federation.num_clients=4",
        "lora.ranks=[4, 4, 2, 2]",
        "federation.fraction=0.5",
        "federation.rounds=4",
        f"federation.catch_up='{catch_up}'",
        "train.max_steps=1",
        "eval.samples=0",
    ]
    config = load_config(TINY, overrides)
    simulation.run(config, tmp_path / "run", quiet=True)
    clients = _rows(tmp_path / "run", "client")
    servers = _rows(tmp_path / "run", "server")
    assert all(len(r["clients"]) == 2 for r in servers)
    assert max(r["catch_up_rounds"] for r in clients) >= (1 if catch_up == "svd" else 2)
    assert all(r["base_drift"] < 1e-6 for r in servers)
    caught_up = [r for r in clients if r["catch_up_rounds"] >= 1]
    assert caught_up and all(r["bytes_down"] > 0 for r in caught_up)


@pytest.mark.parametrize(
    ("method", "ranks"), [("fedit", [4, 4]), ("zero-padding", [4, 2]), ("ffa-lora", [4, 4])]
)
def test_methods_with_a_global_lora_save_a_peft_adapter(tmp_path, method, ranks):
    overrides = [
        f"federation.method='{method}'",
        "federation.num_clients=2",
        f"lora.ranks={ranks}",
        "train.max_steps=2",
        "eval.samples=0",
    ]
    run_dir = tmp_path / method
    simulation.run(load_config(TINY, overrides), run_dir, quiet=True)
    base = AutoModelForCausalLM.from_pretrained(run_dir / "final" / "base")  # the original
    PeftModel.from_pretrained(base, run_dir / "final" / "adapter")
    assert all(r["bytes_down"] > 0 for r in _rows(run_dir, "client"))
    config = json.loads((run_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == max(ranks)


def test_one_base_model_whatever_the_number_of_clients(tmp_path, monkeypatch):
    """Peak memory flat in K: count the storages of embedding-sized tensors during training."""
    counts: list[int] = []
    real = flora.client.train_client

    def counting(model, *args, **kwargs):
        big = model.get_input_embeddings().weight.numel() // 2
        gc.collect()  # count what is held, not cyclic garbage earlier tests left for the collector
        storages = {
            t.untyped_storage().data_ptr()
            for t in (o for o in gc.get_objects() if isinstance(o, torch.Tensor))
            if t.numel() >= big
        }
        counts.append(len(storages))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(flora.client, "train_client", counting)
    for k in (2, 5):
        overrides = [
            f"federation.num_clients={k}",
            f"lora.ranks={[2] * k}",
            "federation.rounds=1",
            "train.max_steps=1",
            "eval.samples=0",
        ]
        simulation.run(load_config(TINY, overrides), tmp_path / f"k{k}", quiet=True)
    assert len(counts) == 7
    assert max(counts) == min(counts) == 1  # the (tied) embedding, once


def test_an_existing_run_is_never_overwritten(tiny_run, capsys):
    assert main(["run", TINY, "--out", str(tiny_run), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_centralized_baseline_trains_one_client_on_all_the_data(tiny_run, tmp_path):
    overrides = ["federation.centralized=true", "train.max_steps=1", "eval.samples=0"]
    simulation.run(load_config(TINY, overrides), tmp_path / "c", quiet=True)
    clients = _rows(tmp_path / "c", "client")
    assert [r["client"] for r in clients] == [0, 0]
    federated = sum(r["examples"] for r in _rows(tiny_run, "client") if r["round"] == 1)
    assert clients[0]["rank"] == 8 and clients[0]["examples"] == federated


@pytest.mark.parametrize("method", ["zero-padding", "flexlora"])
def test_a_larger_client_joining_later_gets_its_full_rank(tmp_path, method):
    """Regression: the global LoRA was as wide as the largest rank among a round's participants,
    so a larger client sampled later got a too-narrow init and training failed."""
    overrides = [
        f"federation.method='{method}'",
        "federation.fraction=0.34",
        "federation.rounds=3",
        "lora.ranks=[2, 4, 8]",
        "train.max_steps=1",
        "eval.samples=0",
    ]
    simulation.run(load_config(TINY, overrides), tmp_path / "run", quiet=True)
    clients = _rows(tmp_path / "run", "client")
    ranks = [2, 4, 8]
    assert len(clients) == 6 and all(r["rank"] == ranks[r["client"]] for r in clients)
    # each client downloads its own rank of the global LoRA: r (out + in) per module
    per_rank = {r["rank"]: r["bytes_down"] / r["rank"] for r in clients}
    assert len(set(per_rank.values())) == 1


def test_the_loss_curve_is_pinned(tmp_path):
    """The tiny run's logged losses equal the stored ones (rtol 1e-5), as torchtune's recipe
    tests pin theirs: a refactor that changes the numbers fails here, loudly. The values were
    written when partitioning moved to flwr-datasets (tests/expected_tiny_losses.json says
    from which commit); the values before held from the round-core refactor until then."""
    tiny_run = tmp_path / "tiny"
    assert main(["run", TINY, "--out", str(tiny_run), "--quiet"]) == 0
    expected = json.loads((Path(__file__).parent / "expected_tiny_losses.json").read_text())
    train = [[r["round"], r["client"], r["train_loss"]] for r in _rows(tiny_run, "client")]
    heldout = [[r["round"], r["heldout_loss"]] for r in _rows(tiny_run, "eval")]
    assert [row[:2] for row in train] == [row[:2] for row in expected["train_loss"]]
    assert [row[0] for row in heldout] == [row[0] for row in expected["heldout_loss"]]
    got = [row[-1] for row in train + heldout]
    want = [row[-1] for row in expected["train_loss"] + expected["heldout_loss"]]
    assert got == pytest.approx(want, rel=1e-5)


def test_client_rows_report_peak_memory(tiny_run):
    assert all(r["peak_rss_mib"] > 10 for r in _rows(tiny_run, "client"))


def test_the_data_row_counts_what_truncation_kept(tiny_run):
    """metrics.jsonl's ``data`` row: per category, rows kept whole, shortened (context or
    instruction cut to keep the answer) and dropped, for the training and held-out splits."""
    (row,) = _rows(tiny_run, "data")
    config = json.loads((tiny_run / "config.json").read_text())
    total = sum(
        c["whole"] + c["shortened"] + c["dropped"]
        for split in ("train", "heldout")
        for c in row[split].values()
    )
    assert total == config["data"]["limit"]
    assert row["dropped"] == 0  # at max_length 96 every answer keeps 32 tokens or all of itself
    assert sum(c["shortened"] for c in row["train"].values()) > 0
    clients = _rows(tiny_run, "client")
    trained = {r["client"]: r["examples"] for r in clients if r["round"] == 1}
    kept = sum(c["whole"] + c["shortened"] for c in row["train"].values())
    assert sum(trained.values()) == kept


def test_config_json_records_what_the_settings_resolved_to(tiny_run):
    saved = json.loads((tiny_run / "config.json").read_text())
    assert saved["lora"]["ranks"] == [8, 4, 2]
    assert saved["model"]["target_modules"]  # the architecture's defaults, written out
    recorded = saved["recorded"]
    assert recorded["device"] == "cpu" and recorded["precision"] == "fp32"
    assert set(recorded["versions"]) >= {"torch", "transformers", "peft", "flwr", "flora-lora"}
    assert recorded["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_a_rank_profile_is_written_out(tmp_path):
    config = load_config(
        TINY,
        [
            "lora.ranks='hetero-3'",
            "federation.rounds=1",
            "threads=1",
            "train.max_steps=1",
            "eval.samples=0",
        ],
    )
    assert config.lora.ranks == "hetero-3"
    simulation.run(config, tmp_path / "run", quiet=True)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lora"]["ranks"] == [16, 8, 4]
