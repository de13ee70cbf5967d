"""`flora aggregate` on real PEFT adapters of a tiny random Llama, and its errors on bad input."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from flora.cli import main

CLIENTS = [  # (rank, alpha, use_rslora, rank_pattern)
    (8, 16, False, {}),
    (4, 4, True, {}),
    (2, 8, False, {"model.layers.1.self_attn.v_proj": 6}),
]


def _base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return LlamaForCausalLM(config).eval()


def _save_client(directory: Path, rank: int, alpha: int, rslora: bool, pattern: dict, seed: int):
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_rslora=rslora,
        rank_pattern=pattern,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(_base(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # B is zero at init: give it trained-looking values
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)


def _merged_weights(adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(_base(), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for k, (rank, alpha, rslora, pattern) in enumerate(CLIENTS):
        _save_client(root / f"client_{k}", rank, alpha, rslora, pattern, seed=k)
        dirs.append(root / f"client_{k}")
    return dirs


def _exact_merged(adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """W + sum_k p_k delta_k, each delta_k taken from peft's own merge of client k."""
    base = {k: v.detach().clone() for k, v in _base().state_dict().items()}
    total = sum(weights)
    expected = {k: v.clone() for k, v in base.items()}
    for directory, weight in zip(adapters, weights, strict=True):
        merged = _merged_weights(directory)
        for key in expected:
            expected[key] += (weight / total) * (merged[key] - base[key])
    return expected


@pytest.mark.parametrize(("method", "extra"), [("flora", []), ("florist", ["--tau", "1"])])
def test_peft_round_trip_matches_the_exact_weighted_sum(adapters, tmp_path, method, extra):
    # Prepare
    weights = [1.0, 2.0, 3.0]
    out = tmp_path / "global"
    # Execute
    code = main(
        ["aggregate", "--method", method, "--weights", "1,2,3", "--out", str(out)]
        + extra
        + [str(d) for d in adapters]
    )
    # Assert
    assert code == 0
    merged = _merged_weights(out)
    expected = _exact_merged(adapters, weights)
    for key, value in expected.items():
        delta = (value - _base().state_dict()[key]).norm()
        error = (merged[key] - value).norm()
        assert error <= 1e-5 * max(float(delta), 1e-12) + 1e-7, key
    report = json.loads((out / "report.json").read_text())
    assert report["noise"] < 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    if method == "flora":  # stacked rank = sum of ranks; module-specific ranks via rank_pattern
        ranks = {m: r for m, r in config["rank_pattern"].items()} | {"default": config["r"]}
        assert 8 + 4 + 6 in ranks.values() and 8 + 4 + 2 in ranks.values()


def test_weights_default_to_the_example_counts_written_beside_adapters(adapters, tmp_path):
    copies = []
    for k, directory in enumerate(adapters):
        copy = tmp_path / directory.name
        shutil.copytree(directory, copy)
        (copy / "flora_client.json").write_text(json.dumps({"examples": [10, 30, 60][k]}))
        copies.append(copy)
    assert main(["aggregate", "--out", str(tmp_path / "g"), *map(str, copies)]) == 0
    assert json.loads((tmp_path / "g" / "report.json").read_text())["weights"] == [0.1, 0.3, 0.6]


def test_zero_padding_writes_per_client_adapters(adapters, tmp_path):
    out = tmp_path / "zp"
    assert (
        main(["aggregate", "--method", "zero-padding", "--out", str(out), *map(str, adapters)]) == 0
    )
    for k in range(3):
        PeftModel.from_pretrained(_base(), out / "clients" / f"client_{k}")
    assert json.loads((out / "report.json").read_text())["noise"] > 1e-3


def test_console_script_runs_and_refuses_to_overwrite(adapters, tmp_path):
    command = [sys.executable, "-m", "flora.cli", "aggregate", "--out", str(tmp_path / "o")]
    first = subprocess.run([*command, str(adapters[0])], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "method flora" in first.stdout
    second = subprocess.run([*command, str(adapters[0])], capture_output=True, text=True)
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"flora: error: {tmp_path / 'o'} already holds an adapter; pass --force or choose "
        "another --out"
    )


# --- bad input: a non-zero exit and one line naming the problem, never a traceback -------------


def _corrupt(adapters: list[Path], tmp_path: Path, how: str) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(adapters[1], bad)
    weights = bad / "adapter_model.safetensors"
    if how == "garbage":
        weights.write_bytes(b"this is not a safetensors file")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "pickle":
        weights.unlink()
        (bad / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    elif how == "nan":
        state = load_file(weights)
        key = next(k for k in state if "lora_B" in k)
        state[key][0, 0] = float("nan")
        save_file(state, weights)
    elif how == "shape":
        config = json.loads((bad / "adapter_config.json").read_text())
        config["r"] = 5
        (bad / "adapter_config.json").write_text(json.dumps(config))
    elif how == "modules":
        state = load_file(weights)
        save_file({k: v for k, v in state.items() if "layers.1." not in k}, weights)
    elif how in ("r-text", "rank-pattern-list"):
        config = json.loads((bad / "adapter_config.json").read_text())
        if how == "r-text":
            config["r"], config["rank_pattern"] = "eight", {}
        else:
            config["rank_pattern"] = [1]
        (bad / "adapter_config.json").write_text(json.dumps(config))
    elif how in ("x1e30", "int32"):
        state = load_file(weights)
        if how == "x1e30":
            state = {k: v * 1e30 if "lora_B" in k else v for k, v in state.items()}
        else:
            state = {k: v.to(torch.int32) for k, v in state.items()}
        save_file(state, weights)
    return bad


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("garbage", "unreadable safetensors file"),
        ("truncated", "unreadable safetensors file"),
        ("pickle", "flora never loads pickles"),
        ("nan", "holds NaN or inf"),
        ("shape", "the config declares r=5"),
        ("modules", "lacks module 'model.layers.1.self_attn.q_proj'"),
        ("r-text", "must be an integer >= 1, got 'eight'"),
        ("rank-pattern-list", "rank_pattern must be a table"),
        ("x1e30", "exceeds 100 x the others' median"),
        ("int32", "has dtype torch.int32; LoRA factors are floating point"),
    ],
)
def test_bad_adapter_files(adapters, tmp_path, capsys, how, message):
    bad = _corrupt(adapters, tmp_path, how)
    code = main(["aggregate", "--out", str(tmp_path / "o"), str(adapters[0]), str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("flora: error: ") and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "1,x"], "expected comma-separated numbers"),
        (["--weights", "1,2,3"], "3 given for 2 clients"),
        (["--weights", "1,-1"], "client 1 has weight -1.0"),
        (["--method", "fedavg"], "method 'fedavg' is unknown"),
        (["--method", "fedit"], "fedit needs equal ranks"),
        (["--tau", "0.5"], "--tau applies to another method"),
    ],
)
def test_bad_options(adapters, tmp_path, capsys, args, message):
    code = main(
        ["aggregate", "--out", str(tmp_path / "o"), *args, str(adapters[0]), str(adapters[1])]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err


def test_an_input_given_twice_is_refused_in_one_line(adapters, tmp_path, capsys):
    again = adapters[0].parent / "." / adapters[0].name  # the same directory, spelt otherwise
    code = main(["aggregate", "--out", str(tmp_path / "o"), str(adapters[0]), str(again)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "given twice (inputs 1 and 2)" in err


def test_missing_directory(tmp_path, capsys):
    assert main(["aggregate", str(tmp_path / "nowhere")]) == 2
    assert "no such adapter directory" in capsys.readouterr().err


def _updates(directory: Path) -> dict[str, torch.Tensor]:
    from flora.adapters import load_peft_adapter

    return {m: f.delta().double() for m, f in load_peft_adapter(directory).modules.items()}


def test_mutated_adapters_never_pass_beyond_the_bound(adapters, tmp_path, capsys):
    """A seeded fuzz: 200 random bit flips (1 to 3) in client 1's weights file or config. Each
    either exits 2 with one line, or exits 0 with a global update within the screening bound of
    the valid one: ||U - U_valid|| <= p_1 (100 x median(others' norms) + ||u_1||) per module."""
    from flora.adapters import load_peft_adapter
    from flora.aggregation.screen import update_norm

    valid = tmp_path / "valid"
    assert main(["aggregate", "--out", str(valid), *map(str, adapters)]) == 0
    reference = _updates(valid)
    p1 = json.loads((valid / "report.json").read_text())["weights"][1]
    norms = [{m: update_norm(f) for m, f in load_peft_adapter(a).modules.items()} for a in adapters]
    bound = {
        m: p1 * (100 * float(torch.tensor([norms[0][m], norms[2][m]]).median()) + norms[1][m])
        for m in reference
    }
    generator = random.Random(20261202)
    outcomes = {0: 0, 2: 0}
    for i in range(200):
        bad = tmp_path / f"m{i}"
        shutil.copytree(adapters[1], bad)
        name = "adapter_config.json" if generator.random() < 0.1 else "adapter_model.safetensors"
        data = bytearray((bad / name).read_bytes())
        for _ in range(generator.randint(1, 3)):
            data[generator.randrange(len(data))] ^= 1 << generator.randrange(8)
        (bad / name).write_bytes(bytes(data))
        out = tmp_path / f"o{i}"
        code = main(["aggregate", "--out", str(out), str(adapters[0]), str(bad), str(adapters[2])])
        captured = capsys.readouterr()
        assert code in outcomes, captured.err
        outcomes[code] += 1
        if code == 2:
            assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
            continue
        for module, update in _updates(out).items():
            gap = float((update - reference[module]).norm())
            assert gap <= bound[module] * (1 + 1e-6) + 1e-9, (i, name, module, gap)
    assert outcomes[0] > 0 and outcomes[2] > 0  # both kinds of mutation happened
