"""State that cannot be silently corrupted, and no dead ends: checkpoint checksums, the config
fingerprint, the run-directory lock, resuming before the first checkpoint, a finished run,
extending one, and kill -9 at seeded random moments."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flora.cli import main
from flora.config import load_config
from flora.metrics import read_metrics
from flora.outputs import RunOutputs

TINY = "configs/tiny.toml"
FAST = [
    "--set",
    "eval.samples=0",
    "--set",
    "data.limit=60",
    "--set",
    "data.heldout=8",
    "--set",
    "data.max_length=48",
    "--set",
    "train.max_steps=1",
    "--set",
    "train.batch_size=2",
    "--set",
    "threads=1",
]
# threads=1 in every run: bitwise comparisons across runs need the same reduction order
ROOT = Path(__file__).resolve().parents[2]


def flora(*args: str) -> int:
    return main([*args, "--quiet"])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model" / "model.safetensors")


def same_model(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-round tiny run of flora (merges) and one of fedit (a global LoRA)."""
    run_dir = tmp_path_factory.mktemp("state") / "run"
    assert flora("run", TINY, *FAST, "--out", str(run_dir)) == 0
    return run_dir


def crashed_copy(run: Path, to: Path, keep: int) -> Path:
    """``run`` as if it had crashed after round ``keep``'s checkpoint."""
    shutil.copytree(run, to)
    for directory in (to / "checkpoints").iterdir():
        if int(directory.name.split("_")[1]) > keep:
            shutil.rmtree(directory)
    shutil.rmtree(to / "final")
    (to / "summary.json").unlink()
    return to


@pytest.mark.parametrize("name", ["update.safetensors", "sketches.safetensors", "rng.safetensors"])
def test_a_flipped_bit_in_a_checkpoint_file_is_refused(finished_run, tmp_path, name, capsys):
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=1)
    path = crashed / "checkpoints" / "round_0001" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # one exponent-ish bit in the middle of the tensor data
    path.write_bytes(bytes(data))
    assert flora("run", "--resume", str(crashed)) == 2
    assert f"{name}: SHA-256 differs" in capsys.readouterr().err


def test_an_earlier_rounds_update_is_checked_too(finished_run, tmp_path, capsys):
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=2)
    shutil.rmtree(crashed / "checkpoints" / "round_0002")  # keep=1 ... but with 2's history:
    shutil.copytree(
        finished_run / "checkpoints" / "round_0002", crashed / "checkpoints" / "round_0002"
    )
    path = crashed / "checkpoints" / "round_0001" / "update.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert flora("run", "--resume", str(crashed)) == 2
    assert "round_0001/update.safetensors: SHA-256 differs" in capsys.readouterr().err


def test_an_unreadable_state_is_one_line(finished_run, tmp_path, capsys):
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=1)
    (crashed / "checkpoints" / "round_0001" / "state.json").write_text("{not json")
    assert flora("run", "--resume", str(crashed)) == 2
    assert "state.json: unreadable" in capsys.readouterr().err


def edit_state(run: Path, change: Callable[[dict], None]) -> None:
    path = run / "checkpoints" / "round_0001" / "state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("history emptied", lambda s: s.update(history_rounds=[])),
        ("synced removed", lambda s: s.pop("synced")),
    ],
)
def test_an_edited_state_is_refused_in_one_line(finished_run, tmp_path, capsys, case, change):
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=1)
    edit_state(crashed, change)
    assert flora("run", "--resume", str(crashed)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "state.json: its contents differ from the digest" in err


def test_a_state_without_synced_is_one_line_even_without_a_digest(finished_run, tmp_path, capsys):
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=1)
    edit_state(crashed, lambda s: (s.pop("synced"), s.pop("digest")))  # an older checkpoint's
    assert flora("run", "--resume", str(crashed)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no 'synced'" in err


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "[" * 100_000])
def test_a_config_that_is_not_a_json_object_is_one_line(finished_run, tmp_path, capsys, text):
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=1)
    (crashed / "config.json").write_text(text)
    assert flora("run", "--resume", str(crashed)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err, err


DAMAGE = {
    "binary garbage": (b"garbage\x00\xff{{\n", "byte 8 is not UTF-8 text"),
    "a line that is not JSON": (
        b'{"kind": "eval", "round": 0}\nnot json\n{"kind": "x"}\n',
        "line 2 is not a JSON row",
    ),
    "a row without a kind": (b"[1, 2]\n", "line 1 is not a JSON object with a kind"),
    "a round that is not a number": (
        b'{"kind": "eval", "round": "x"}\n',
        "line 1: round 'x' is not an integer",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.parametrize("command", ["resume", "compare"])
def test_a_damaged_metrics_file_is_one_line(finished_run, tmp_path, capsys, case, command):
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=1)
    data, reason = DAMAGE[case]
    (crashed / "metrics.jsonl").write_bytes(data)
    if command == "resume":
        assert flora("run", "--resume", str(crashed)) == 2
    else:
        assert main(["compare", str(crashed), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert f"metrics.jsonl is damaged ({reason}" in err and "Traceback" not in err


def test_a_torn_last_row_is_skipped(finished_run, tmp_path):
    """A crash mid-write leaves a last line without its newline: resume drops it, as the row is
    written again."""
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=1)
    with open(crashed / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "server", "round": 2, "cli')
    assert flora("run", "--resume", str(crashed)) == 0
    assert same_model(crashed, finished_run)

    def shape(run: Path) -> list[tuple[str, int]]:
        return [(r["kind"], r["round"]) for r in read_metrics(run / "metrics.jsonl")]

    assert shape(crashed) == shape(finished_run)


def test_a_missing_metrics_file_is_refused_on_resume(finished_run, tmp_path, capsys):
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=1)
    (crashed / "metrics.jsonl").unlink()
    assert flora("run", "--resume", str(crashed)) == 2
    assert "metrics.jsonl is missing, and a resumed run needs" in capsys.readouterr().err


def test_an_edited_config_is_refused(finished_run, tmp_path, capsys):
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=1)
    config = json.loads((crashed / "config.json").read_text())
    config["federation"]["method"] = "fedit"
    config["lora"]["ranks"] = [4, 4, 4]
    (crashed / "config.json").write_text(json.dumps(config))
    assert flora("run", "--resume", str(crashed)) == 2
    assert "differs from the config this run's checkpoints were written with" in (
        capsys.readouterr().err
    )


def test_a_second_process_on_a_run_directory_is_refused(tmp_path):
    # Prepare: another process holds the run directory
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from flora.outputs import _lock; h = _lock(Path(sys.argv[1])); print('held', "
            "flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        # Execute / Assert: refused at once, naming the holder; nothing written
        with pytest.raises(Exception, match=rf"is in use by flora pid {holder.pid}"):
            RunOutputs.open(tmp_path, load_config(TINY), resume=False, hint="")
        assert not (tmp_path / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    RunOutputs.open(tmp_path, load_config(TINY), resume=False, hint="").close()  # free again


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert flora("run", TINY, "--out", str(tmp_path / "file")) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err


def test_resuming_before_the_first_checkpoint_starts_from_the_beginning(finished_run, tmp_path):
    crashed = crashed_copy(finished_run, tmp_path / "run", keep=0)
    assert flora("run", "--resume", str(crashed)) == 0
    assert same_model(crashed, finished_run)
    rows = read_metrics(crashed / "metrics.jsonl")
    assert [r["round"] for r in rows if r["kind"] == "eval"] == [0, 2]


def test_a_finished_run_says_so_and_changes_nothing(finished_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    assert flora("run", "--resume", str(finished_run)) == 0
    assert "finished all 2 rounds; nothing changed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()} == before


def test_rounds_extends_a_finished_run_as_if_it_had_run_that_long(finished_run, tmp_path):
    # Prepare: a 1-round run, and the same run for 2 rounds (finished_run)
    short = tmp_path / "short"
    assert flora("run", TINY, *FAST, "--set", "federation.rounds=1", "--out", str(short)) == 0
    # Execute
    assert flora("run", "--resume", str(short), "--rounds", "2") == 0
    # Assert: the same model bitwise, one final eval row, the extended config recorded
    assert same_model(short, finished_run)
    finals = [r for r in read_metrics(short / "metrics.jsonl") if r.get("final")]
    assert [(r["kind"], r["round"]) for r in finals] == [("eval", 2)]
    assert json.loads((short / "config.json").read_text())["federation"]["rounds"] == 2


def test_rounds_cannot_shorten_a_run(finished_run, capsys):
    assert flora("run", "--resume", str(finished_run), "--rounds", "1") == 2
    assert "already has 2 rounds" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.ranks=[8, 4, 100000]", "client 2's rank 100000 exceeds min(out, in) = 64"),
        ("eval.max_new_tokens=-5", "eval.max_new_tokens must be >= 1"),
        ("seed=100000000000000000000000", "seed"),
    ],
)
def test_bad_values_are_one_line(tmp_path, capsys, override, message):
    assert flora("run", TINY, *FAST, "--set", override, "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


DATA = {  # a data file's bytes, and what its one line says
    "empty.jsonl": (b"", "the file is empty"),
    "blank.json": (b"  \n", "the file is empty"),
    "latin1.jsonl": (b'{"instruction": "caf\xe9"}\n', "line 1 is not UTF-8 text"),
    "deep.jsonl": (b"[" * 100_000 + b"\n", "line 1 is nested too deeply"),
    "deep.json": (b"[" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("name", list(DATA))
def test_a_bad_data_file_is_one_line(tmp_path, capsys, name):
    data, message = DATA[name]
    (tmp_path / name).write_bytes(data)
    override = f"data.source='{tmp_path / name}'"
    assert flora("run", TINY, *FAST, "--set", override, "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("text", "message"),
    [(b"seed = 1\n\xff\xfe\n", "byte 9 is not UTF-8 text"), (b"a = " + b"[" * 100_000, "")],
)
def test_a_bad_config_file_is_one_line(tmp_path, capsys, text, message):
    (tmp_path / "bad.toml").write_bytes(text)
    assert flora("run", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "bad.toml" in err, err


def test_a_pickled_model_directory_is_refused(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    spec = f"model.name='{tmp_path / 'model'}'"
    assert (
        flora(
            "run",
            TINY,
            *FAST,
            "--set",
            spec,
            "--set",
            "model.target_modules=['q_proj']",
            "--out",
            str(tmp_path / "r"),
        )
        == 2
    )
    assert "holds only pickled weights" in capsys.readouterr().err


def _kill_and_resume(reference: Path, work: Path, moment: tuple[int, float]) -> None:
    """Kill -9 a tiny run once its metrics.jsonl holds ``rows`` rows, ``extra`` seconds later
    (a moment tied to the run's progress, not to this machine's speed); then resume it."""
    rows, extra = moment
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "flora.cli", "run", TINY, *FAST, "--out", str(work), "--quiet"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = work / "metrics.jsonl"
    while process.poll() is None and len(read_metrics(metrics)) < rows:
        time.sleep(0.02)
    time.sleep(extra)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stage = sorted(p.name for p in (work / "checkpoints").glob("round_*")) if work.exists() else []
    print(f"killed at {rows} rows + {extra:.2f} s, checkpoints {stage}")  # pytest -s shows it
    if (work / "summary.json").is_file():  # it finished before the kill
        assert same_model(work, reference)
        return
    resume = [sys.executable, "-m", "flora.cli", "run", "--resume", str(work), "--quiet"]
    done = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True)
    if not (work / "config.json").is_file():  # killed before the run directory existed
        assert done.returncode == 2
        return
    assert done.returncode == 0, done.stderr
    assert same_model(work, reference)
    finals = [r for r in read_metrics(work / "metrics.jsonl") if r.get("final")]
    assert len(finals) == 1


def _delays(count: int) -> list[tuple[int, float]]:
    """Seeded kill moments: after 0 to 9 rows (a 2-round tiny run writes 10), plus 0-0.5 s."""
    generator = random.Random(20261202)
    return [(generator.randint(0, 9), generator.uniform(0.0, 0.5)) for _ in range(count)]


@pytest.mark.parametrize("moment", _delays(2))
def test_kill_9_then_resume_equals_the_uninterrupted_run(finished_run, tmp_path, moment):
    _kill_and_resume(finished_run, tmp_path / "run", moment)


@pytest.mark.slow
@pytest.mark.parametrize("moment", _delays(10))
def test_kill_9_at_ten_seeded_moments(finished_run, tmp_path, moment):
    _kill_and_resume(finished_run, tmp_path / "run", moment)
