"""MMLU inside `flora run` (eval.mmlu): rows before, every N rounds, after; compare reads them."""

from __future__ import annotations

import pytest

from flora import simulation
from flora.config import load_config
from flora.data.sources import find_shared_data
from flora.errors import FloraError
from flora.evaluation import load_mmlu, score_mmlu, summarize_run, write_report
from flora.metrics import read_metrics
from flora.models import load_model

TINY = "configs/tiny.toml"
MMLU = [
    "eval.mmlu=true",
    "eval.mmlu_limit_per_subject=1",
    "eval.mmlu_shots=1",
    "eval.samples=0",
    "train.max_steps=1",
    "data.limit=60",
    "data.heldout=8",
]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(autouse=True)
def _needs_mmlu() -> None:
    if find_shared_data("mmlu/dev/abstract_algebra_dev.csv") is None:
        pytest.skip("shared MMLU copy not found (set FLORA_DATA_DIR)")


def test_mmlu_rows_come_before_every_n_rounds_and_after(tmp_path):
    # Prepare
    config = load_config(TINY, [*MMLU, "federation.rounds=3", "eval.mmlu_every=2"])
    # Execute
    simulation.run(config, tmp_path / "run", quiet=True)
    # Assert: rounds 0 (base), 2 (every 2) and 3 (last); the last one scores final/model
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "mmlu"]
    assert [r["round"] for r in rows] == [0, 2, 3]
    assert all(r["questions"] == 57 and len(r["per_subject"]) == 57 for r in rows)
    model, tokenizer = load_model(str(tmp_path / "run" / "final" / "model"))
    again = score_mmlu(
        model,
        tokenizer,
        load_mmlu("test"),
        load_mmlu("dev"),
        shots=1,
        limit_per_subject=1,
        batch_size=config.eval.batch_size,
    ).scores()
    assert rows[-1]["acc"] == pytest.approx(again["mmlu"].acc)
    assert rows[-1]["acc_macro"] == pytest.approx(again["mmlu"].acc_macro)
    assert rows[-1]["acc_stderr"] is None  # one question a subject: the harness's "N/A"
    assert rows[-1]["groups"]["mmlu_humanities"]["acc"] == pytest.approx(
        again["mmlu_humanities"].acc
    )
    assert set(rows[-1]["groups"]) == {
        "mmlu_stem",
        "mmlu_other",
        "mmlu_social_sciences",
        "mmlu_humanities",
    }
    # ... and flora compare takes the run's own MMLU and plots it by round
    summary = summarize_run(tmp_path / "run")
    assert summary.mmlu == rows[-1]["acc"] and summary.mmlu_stderr is None
    assert summary.mmlu_by_round == [(r["round"], r["acc"]) for r in rows]
    written = write_report([summary], tmp_path / "report")
    assert (tmp_path / "report" / "mmlu_round.png").stat().st_size > 5000
    assert any(p.name == "report.md" for p in written)


def test_mmlu_is_off_unless_asked():
    assert not load_config(TINY, []).eval.mmlu_at(0, 1)
    assert not load_config("configs/default.toml", []).eval.mmlu_at(0, 1)


def test_mmlu_every_without_mmlu_names_the_field():
    with pytest.raises(FloraError, match="eval.mmlu_every .*set eval.mmlu = true"):
        load_config(TINY, ["eval.mmlu_every=2"])
