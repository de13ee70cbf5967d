"""`flora compare` over hand-written run directories: table figures, report files, real plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from flora.cli import main
from flora.evaluation.report import segments
from flora.evaluation.runs import format_ranks, summarize_run


def _write_run(
    root: Path, name: str, method: str, ranks: list[int] | str, losses: list[float], **extra
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    federation = {"method": method, "centralized": extra.get("centralized", False)}
    config = {
        "seed": 0,
        "lora": {"ranks": ranks},
        "federation": federation,
        "model": {"name": "smollm2", "target_modules": ["q_proj"]},
    }
    (run / "config.json").write_text(json.dumps(config))
    categories = extra.get("categories")
    rows = [{"kind": "eval", "round": 0, "heldout_loss": losses[0]}]
    if categories:
        rows[0]["per_category"] = {c: before for c, (before, _) in categories.items()}
    for t, loss in enumerate(losses[1:], start=1):
        for client in range(2):
            rows.append(
                {
                    "kind": "client",
                    "round": t,
                    "client": client,
                    "bytes_up": 100 * (client + 1),
                    "bytes_down": 1000 * t,
                }
            )
        server = {"kind": "server", "round": t, "noise": 0.1 * t, "round_seconds": 2.0}
        if t < len(losses) - 1:
            server["heldout_loss"] = loss
        rows.append(server)
    rows.append(
        {"kind": "eval", "round": len(losses) - 1, "heldout_loss": losses[-1], "final": True}
    )
    if categories:
        rows[-1]["per_category"] = {c: after for c, (_, after) in categories.items()}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if "seconds" in extra:
        (run / "summary.json").write_text(json.dumps({"seconds": extra["seconds"]}))
    if "eval" in extra:
        (run / "eval").mkdir()
        (run / "eval" / "eval.json").write_text(json.dumps(extra["eval"]))
    return run


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    evaluation = {  # what flora eval writes: lm-evaluation-harness's shape
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.31, "acc_stderr,none": 0.0123},
            "flora_heldout_open_qa": {"alias": "open_qa", "loss,none": 2.0},
            "flora_heldout_summarization": {"alias": "summarization", "loss,none": 2.5},
        },
        "group_subtasks": {
            "flora_heldout": ["flora_heldout_open_qa", "flora_heldout_summarization"]
        },
    }
    return [
        _write_run(
            tmp_path,
            "flora-run",
            "flora",
            [4, 2],
            [3.0, 2.5, 2.2],
            seconds=42.0,
            eval=evaluation,
            categories={"open_qa": (3.1, 2.0), "summarization": (2.9, 2.5)},
        ),
        _write_run(tmp_path, "fedit-run", "fedit", "homo-16", [3.0, 2.8, 2.7, 2.6]),
    ]


def test_summary_sums_bytes_averages_noise_and_builds_the_curves(runs):
    # Execute
    flora, fedit = summarize_run(runs[0]), summarize_run(runs[1])
    # Assert
    assert (flora.method, flora.ranks, flora.final_loss, flora.mmlu) == ("flora", "4,2", 2.2, 0.31)
    assert flora.bytes_up == 2 * 300 and flora.bytes_down == 2 * 1000 + 2 * 2000
    assert flora.seconds == 42.0  # summary.json
    assert fedit.seconds == 3 * 2.0  # no summary.json: the rounds' seconds
    assert flora.noise == pytest.approx(0.15)
    assert flora.loss_by_round == [(0, 3.0), (1, 2.5), (2, 2.2)]
    assert flora.loss_by_downlink == [(0, 3.0), (2000, 2.5), (6000, 2.2)]
    assert fedit.ranks == "10x16" and fedit.mmlu is None and fedit.per_category == {}
    assert flora.mmlu_stderr == 0.0123
    assert flora.per_category == {"open_qa": 2.0, "summarization": 2.5}


def test_format_ranks_groups_repeats():
    assert format_ranks([64, 32, 16, 16, 8, 8, 4, 4, 4, 4]) == "64,32,2x16,2x8,4x4"
    assert format_ranks([8]) == "8"


def test_compare_writes_reports_with_non_blank_plots(runs, tmp_path, capsys):
    # Execute
    out = tmp_path / "report"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    # Assert
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["loss_category.png", "loss_downlink.png", "loss_round.png"]
    for png in out.glob("*.png"):
        pixels = imread(png)
        assert pixels.ndim == 3 and float(np.var(pixels)) > 0, png
    markdown = (out / "report.md").read_text()
    assert (
        "| flora-run | flora | 4,2 | 2.2000 | -0.8000 | 31.0% ± 1.2 | 0.001 | 0.006 | 42 s | "
        "1.50e-01 |" in markdown
    )
    assert "| fedit-run | fedit | 10x16 | 2.6000 | -0.4000 | – |" in markdown
    assert "![loss_round](loss_round.png)" in markdown
    assert "flora-run: flora eval, ? questions" in markdown
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<td>fedit-run</td>" in page
    assert "¹ MMLU: lm-evaluation-harness" in page and "smollm2 (q_proj)" in page  # notes, setup
    assert "flora-run" in capsys.readouterr().out


def test_a_centralized_run_shows_no_communication_and_labels_name_runs(runs, tmp_path):
    central = _write_run(tmp_path, "c", "flora", [16], [3.0, 2.4], centralized=True)
    out = tmp_path / "report"
    assert main(["compare", str(runs[0]), "--label", f"all data={central}", "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "| all data | centralized | 16 (centralized) | 2.4000 | -0.6000 | – | n/a | n/a |" in (
        markdown
    )
    assert "centralized run, which communicates nothing" in markdown


def test_lines_join_consecutive_rounds_only():
    assert segments([(0, 1.0), (2, 0.9)], [0, 2]) == [[0], [1]]  # eval.every = 0: two points
    assert segments([(0, 1.0), (1, 0.9), (2, 0.8), (4, 0.7)], [0, 1, 2, 4]) == [[0, 1, 2], [3]]


def test_per_category_plot_is_left_out_without_per_category_rows(runs, tmp_path):
    out = tmp_path / "report"
    assert main(["compare", str(runs[1]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["loss_downlink.png", "loss_round.png"]


def test_an_eval_json_of_the_old_shape_is_one_line_naming_the_fix(runs, tmp_path, capsys):
    # Prepare: eval.json as flora wrote it before it followed the harness
    old = {"model": "x", "mmlu": {"macro_accuracy": 0.31, "micro_accuracy": 0.3}}
    (runs[0] / "eval" / "eval.json").write_text(json.dumps(old))
    # Execute
    code = main(["compare", str(runs[0]), "--out", str(tmp_path / "report")])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "lm-evaluation-harness's results shape" in err and "re-run `flora eval" in err


@pytest.mark.parametrize(
    ("row", "acc", "stderr"),
    [
        ({"acc": 0.3, "acc_stderr": 0.01, "acc_macro": 0.28}, 0.3, 0.01),
        ({"macro_accuracy": 0.28, "micro_accuracy": 0.3}, 0.3, None),  # a row of an older flora
    ],
)
def test_the_runs_own_mmlu_row_is_its_weighted_accuracy(tmp_path, row, acc, stderr):
    # Prepare
    run = _write_run(tmp_path, "run", "flora", [4, 2], [3.0, 2.5])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"kind": "mmlu", "round": 1} | row) + "\n")
    # Execute
    summary = summarize_run(run)
    # Assert: micro accuracy (correct / questions) is the size-weighted figure
    assert (summary.mmlu, summary.mmlu_stderr, summary.mmlu_by_round) == (acc, stderr, [(1, acc)])
