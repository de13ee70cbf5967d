"""`flora eval` end to end on a tiny run, eval.json in lm-evaluation-harness's shape, its
options' defaults, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flora.cli import main
from flora.data.sources import find_shared_data
from flora.metrics import read_metrics

TINY = "configs/tiny.toml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    overrides = ["federation.rounds=1", "train.max_steps=2", "eval.samples=0"]
    args = ["run", TINY, "--out", str(run_dir), "--quiet"]
    assert main([*args, *(a for o in overrides for a in ("--set", o))]) == 0
    return run_dir


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "{tmp}/no-such-run"], "no such run directory or model"),
        (["eval", "{tmp}", "--tasks", "heldout,speed"], "unknown task ['speed']"),
        (["eval", "{tmp}", "--tasks", ""], "unknown task"),
        (["eval", "{tmp}"], "neither a flora run directory nor a model checkpoint"),
        (["eval", "smollm2", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["eval", "smollm2", "--limit-per-subject", "0"], "(--full scores every question)"),
        (["compare", "{tmp}/no-such-run"], "no such run directory"),
        (["compare", "{tmp}"], "no metrics.jsonl"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    # Execute
    code = main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("flora: error:")
    assert message in err


def test_eval_of_a_run_reproduces_its_final_heldout_loss(tiny_run, capsys):
    # Execute
    assert main(["eval", str(tiny_run), "--tasks", "heldout", "--quiet"]) == 0
    # Assert
    result = json.loads((tiny_run / "eval" / "eval.json").read_text())
    final = next(r for r in read_metrics(tiny_run / "metrics.jsonl") if r.get("final"))
    held = result["results"]["flora_heldout"]
    assert held["loss,none"] == pytest.approx(final["heldout_loss"], rel=1e-5)
    assert 0 < held["sample_len"] <= 16  # data.heldout=16, less those max_length cut to nothing
    categories = result["group_subtasks"]["flora_heldout"]
    assert categories and all(c.startswith("flora_heldout_") for c in categories)
    assert sum(result["results"][c]["sample_len"] for c in categories) == held["sample_len"]
    assert "groups" not in result  # no MMLU: no group with an aggregate, as the harness writes
    assert "held-out  loss" in capsys.readouterr().out


def test_a_run_without_final_model_is_evaluated_from_its_adapter(tmp_path):
    """output.model = false: flora eval merges final/adapter into the run's base, and finds the
    run's own final held-out loss."""
    run_dir = tmp_path / "run"
    overrides = ["federation.rounds=1", "train.max_steps=2", "eval.samples=0", "output.model=false"]
    args = ["run", TINY, "--out", str(run_dir), "--quiet"]
    assert main([*args, *(a for o in overrides for a in ("--set", o))]) == 0
    assert not (run_dir / "final" / "model").exists()
    assert main(["eval", str(run_dir), "--tasks", "heldout", "--quiet"]) == 0
    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    final = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("final"))
    assert result["results"]["flora_heldout"]["loss,none"] == pytest.approx(
        final["heldout_loss"], rel=1e-5
    )


def test_eval_mmlu_and_samples_merge_into_eval_json(tiny_run, tmp_path, torch_single_thread):
    if find_shared_data("mmlu/dev/abstract_algebra_dev.csv") is None:
        pytest.skip("shared MMLU copy not found (set FLORA_DATA_DIR)")
    if find_shared_data("mt-bench/question.jsonl") is None:
        pytest.skip("shared MT-Bench copy not found (set FLORA_DATA_DIR)")
    out = tmp_path / "eval"
    common = ["--out", str(out), "--quiet"]
    # Execute: two evaluations into one folder, then MMLU again with another limit
    assert main(["eval", str(tiny_run), "--tasks", "heldout", *common]) == 0
    argv = ["eval", str(tiny_run), "--tasks", "mmlu,samples", "--limit-per-subject", "1"]
    options = ["--shots", "1", "--num-samples", "2", "--max-new-tokens", "2"]
    assert main([*argv, *options, *common]) == 0
    first = json.loads((out / "eval.json").read_text())
    argv = ["eval", str(tiny_run), "--tasks", "mmlu", "--limit-per-subject", "2", "--shots", "1"]
    assert main([*argv, *common]) == 0
    # Assert: every task's results, the last MMLU's in place of the first
    result = json.loads((out / "eval.json").read_text())
    results = result["results"]
    assert {"flora_heldout", "flora_samples", "mmlu", "mmlu_stem"} <= set(results)
    assert results["flora_heldout"] == first["results"]["flora_heldout"]
    assert len([n for n in results if n.startswith("mmlu_")]) == 4 + 57
    assert results["mmlu"]["sample_len"] == 2 * 57 and result["config"]["limit"] == 2
    assert first["results"]["mmlu"]["acc_stderr,none"] == "N/A"  # one question a subject
    assert isinstance(results["mmlu"]["acc_stderr,none"], float)
    assert 0.0 <= results["mmlu"]["acc,none"] <= 1.0
    assert set(result["groups"]) == {
        "mmlu",
        "mmlu_stem",
        "mmlu_other",
        "mmlu_social_sciences",
        "mmlu_humanities",
    }
    assert result["n-samples"]["mmlu_anatomy"] == {"original": 135, "effective": 2}
    assert result["n-shot"]["mmlu_anatomy"] == 1
    assert result["timings"]["mmlu"]["questions_per_second"] > 0
    assert set(result["timings"]) == {"heldout", "mmlu", "samples"}
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 2 and {"prompt", "base", "tuned"} <= set(samples[0])
    assert results["flora_samples"]["base"] == "tiny-llama"
    assert result["config"]["model"] == str(tiny_run / "final" / "model")


def test_an_eval_json_of_the_old_shape_is_replaced(tiny_run, tmp_path):
    # Prepare: what flora wrote before it followed the harness
    out = tmp_path / "eval"
    out.mkdir()
    old = {"model": str(tiny_run / "final" / "model"), "mmlu": {"macro_accuracy": 0.3}}
    (out / "eval.json").write_text(json.dumps(old))
    # Execute
    assert main(["eval", str(tiny_run), "--tasks", "heldout", "--out", str(out), "--quiet"]) == 0
    # Assert
    result = json.loads((out / "eval.json").read_text())
    assert "mmlu" not in result and "flora_heldout" in result["results"]


def test_help_shows_every_default(capsys):
    # Execute
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    # Assert: each option's help, joined across its wrapped lines, names its default
    text = capsys.readouterr().out
    options = text[text.index("options:") :].split("\n  -")[1:]
    assert len(options) == 15, options
    for option in options:
        if not option.startswith("h, --help"):
            assert "(default: " in " ".join(option.split()), option
    flat = " ".join(text.split())
    assert "(default: 20)" in flat and "--full" in flat and "(1,140 of 14,042" in flat


def _captured_options(monkeypatch, argv):
    """The EvalOptions `flora eval ARGV` hands to evaluate, nothing evaluated."""
    import flora.evaluation

    seen = []

    def fake(target, options, out, *, quiet):
        seen.append(options)
        return {"config": {"model": target.model, "precision": "fp32", "device": "cpu"}}

    monkeypatch.setattr(flora.evaluation, "evaluate", fake)
    monkeypatch.setattr(flora.evaluation, "format_results", lambda result, tasks: "")
    assert main(["eval", "tiny-llama", "--tasks", "mmlu", *argv]) == 0
    return seen[0]


@pytest.mark.parametrize(
    ("argv", "limit"),
    [([], 20), (["--full"], 0), (["--limit-per-subject", "3"], 3)],
)
def test_mmlu_is_limited_to_20_a_subject_unless_full(monkeypatch, tmp_path, argv, limit):
    options = _captured_options(monkeypatch, [*argv, "--out", str(tmp_path)])
    assert options.limit_per_subject == limit


def test_full_and_a_limit_exclude_each_other(capsys):
    assert main(["eval", "smollm2", "--full", "--limit-per-subject", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --limit-per-subject, or --full" in err
