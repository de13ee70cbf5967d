"""Every user-facing failure is one line (issue 27, part 4): OS errors name the path and what to
do, anything unexpected names the file its traceback went to, unbounded values are refused or
bounded, and a huge data line is refused without being read whole."""

from __future__ import annotations

import errno
import json
import re
import shutil
import tracemalloc
from pathlib import Path

import pytest

from flora import checkpoint, engine
from flora.cli import main
from flora.data import sources
from flora.errors import FloraError
from flora.metrics import read_metrics

TINY = "configs/tiny.toml"
FAST = [
    "eval.samples=0",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=48",
    "train.max_steps=1",
    "train.batch_size=2",
    "threads=1",
]


def cli(*args: str, sets: list[str] = FAST) -> int:
    overrides = [a for s in sets for a in ("--set", s)]
    return main([*args, *overrides, "--quiet"])


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_disk_full_during_a_checkpoint_is_one_line_and_the_run_resumes(
    tmp_path, monkeypatch, capsys
):
    # Prepare: the disk fills while round 2's checkpoint is written
    real = checkpoint.save_file
    run_dir = tmp_path / "run"

    def full(tensors, path, *args, **kwargs):
        if "round_0002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full)
    # Execute
    code = cli("run", TINY, "--out", str(run_dir), sets=[*FAST, "federation.rounds=3"])
    # Assert: exit 1, one line naming the path and the fix; round 1's checkpoint intact
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "no space left" in line and "round_0002" in line and "--resume" in line
    assert (run_dir / "checkpoints" / "round_0001" / "state.json").is_file()
    # Execute: space again, resume
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["round"] == 3


def test_an_unexpected_error_is_one_line_naming_its_traceback_file(tmp_path, monkeypatch, capsys):
    # Prepare: a bug deep inside the round loop
    def broken(*args, **kwargs):
        raise TypeError("injected bug\nsecond line")

    monkeypatch.setattr(engine.RunCore, "play_round", broken)
    # Execute
    code = cli("run", TINY, "--out", str(tmp_path / "run"))
    # Assert: exit 1, one line, the traceback in the named file
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "unexpected error: TypeError: injected bug" in line
    (saved,) = re.findall(r"full traceback: (\S+?);", line)
    text = Path(saved).read_text()
    assert "Traceback" in text and "play_round" not in line and "broken" in text
    Path(saved).unlink()


def test_flora_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORA_DEBUG", "1")
    monkeypatch.setattr(engine.RunCore, "play_round", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli("run", TINY, "--out", str(tmp_path / "run"))


def test_an_adapter_config_nested_100000_deep_is_one_line(tmp_path, capsys):
    # Prepare: a real run's adapter, twice, one with a hostile adapter_config.json
    assert cli("run", TINY, "--out", str(tmp_path / "run")) == 0
    good = tmp_path / "run" / "final" / "adapter"
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "adapter_config.json").write_text('{"r":' * 100_000 + "1" + "}" * 100_000)
    # Execute
    code = main(["aggregate", str(bad), str(good), "--out", str(tmp_path / "out")])
    # Assert
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "adapter_config.json: JSON nested too deep" in line


def test_a_grad_accum_beyond_an_epoch_of_the_largest_client_is_refused(tmp_path, capsys):
    code = cli(
        "run", TINY, "--out", str(tmp_path / "run"), sets=[*FAST, "train.grad_accum=1000000000"]
    )
    line = one_line(capsys.readouterr().err)
    assert code == 2 and re.search(r"train.grad_accum must be at most \d+", line)


def test_max_new_tokens_is_bounded_by_the_models_context(tmp_path):
    # Prepare / Execute: a sample answer of up to 10^9 tokens on the tiny model (context 512)
    sets = [*FAST, "eval.samples=1", "eval.max_new_tokens=1000000000", "federation.rounds=1"]
    assert cli("run", TINY, "--out", str(tmp_path / "run"), sets=sets) == 0
    # Assert: it finished; the sample stopped at the context
    (row, *_) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert row["samples"] and len(row["samples"][0]["answer"]) < 512 * 20


def test_a_huge_json_line_is_refused_without_reading_it_whole(tmp_path):
    # Prepare: one 40 MiB line
    path = tmp_path / "one-line.jsonl"
    with path.open("w") as f:
        f.write('{"instruction": "' + "x" * (40 * 2**20) + '"}\n')
    # Execute
    tracemalloc.start()
    with pytest.raises(FloraError, match="line 1 is longer than 16 MiB"):
        sources.load_records(str(path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Assert: at most about one line's limit was held (16 Mi characters, not 40)
    assert peak < 40 * 2**20


def test_a_json_array_beyond_the_bound_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_JSON_ARRAY", 100)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"instruction": "x" * 50, "response": "y"}] * 4))
    with pytest.raises(FloraError, match="save it as JSON lines"):
        sources.load_records(str(path))
