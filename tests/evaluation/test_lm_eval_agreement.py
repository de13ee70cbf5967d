"""lm-evaluation-harness scores MMLU as flora's scorer does, question by question (slow).

lm-eval (the dev extra) runs a local task over the shared MMLU CSVs: a task YAML written the way
its own ``mmlu`` default template is (the subject's description line, the first five dev
questions as shots, "Answer:", choices " A" ... " D"), on a model already in memory (HFLM: no
download). For every question its per-sample record (``log_samples``) must hold flora's prompt
(``format_prompt``), four log-likelihoods equal to flora's (``score_prompts``) within TOLERANCE,
and the prediction flora's ``score_mmlu`` makes.

Two models: the tiny random Llama on every question of three subjects (every prompt checked
through its log-likelihoods, though a random model answers B to everything), and the packaged
SmolLM2 on the first questions of each (a real model, whose answers vary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from flora.data.sources import find_shared_data
from flora.evaluation.mmlu import (
    build_prompt_ids,
    letter_ids,
    max_context,
    score_mmlu,
    score_prompts,
)
from flora.evaluation.mmlu_data import LETTERS, format_prompt, load_mmlu

pytestmark = pytest.mark.slow

# college_physics' test question 60 has the choice "None": pandas reads "None", "NA", "" and the
# like as missing values unless the task sets keep_default_na: false
SUBJECTS = ("abstract_algebra", "college_physics", "management")
SHOTS = 5
BATCH = 8
TOLERANCE = 1e-4  # fp32; seen: 1.0e-6 (tiny Llama), 1.4e-5 (SmolLM2, prefix-cached batches)


def _harness():
    """lm_eval's entry point, HFLM and TaskManager, or a skip naming the extra."""
    reason = "lm-evaluation-harness is not installed: pip install -e '.[dev]'"
    lm_eval = pytest.importorskip("lm_eval", reason=reason)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    return lm_eval, HFLM, TaskManager


def _mmlu_folder() -> Path:
    found = find_shared_data(f"mmlu/test/{SUBJECTS[0]}_test.csv")
    if found is None:
        pytest.skip("shared MMLU copy not found (set FLORA_DATA_DIR)")
    return found.parents[1]


def _write_task(folder: Path, subject: str, mmlu: Path) -> str:
    """A local lm-eval task over one subject's CSVs, as lm-eval's mmlu/_default_template_yaml."""
    name = f"flora_mmlu_{subject}"
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "csv",
        "dataset_kwargs": {
            "data_files": {
                "test": str(mmlu / "test" / f"{subject}_test.csv"),
                "dev": str(mmlu / "dev" / f"{subject}_dev.csv"),
            },
            "keep_default_na": False,  # "None", "NA", "": text, as flora reads them
            "na_filter": False,
            "cache_dir": str(folder / "datasets-cache"),
        },
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": SHOTS,
        "output_type": "multiple_choice",
        "description": "The following are multiple choice questions (with answers) about "
        f"{subject.replace('_', ' ')}.\n\n",
        "doc_to_text": "{{question.strip()}}\n"
        + "".join(f"{letter}. {{{{choice{i}}}}}\n" for i, letter in enumerate(LETTERS))
        + "Answer:",
        "doc_to_choice": list(LETTERS),
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return name


def _tiny_llama_2k():
    """flora's tiny random Llama and its shipped tokenizer, with a 2,048-token context: 5-shot
    prompts of these subjects run to ~700 tokens, and past a context flora drops whole shots,
    lm-eval tokens from the left. Llama's RoPE has no position table: only the config changes."""
    from flora.models import load_model

    model, tokenizer = load_model("tiny-llama")
    model.config.max_position_embeddings = 2048
    return model, tokenizer


def _smollm2():
    from flora.models import load_model

    return load_model("smollm2")


@pytest.mark.parametrize(
    ("load", "limit"),
    [(_tiny_llama_2k, None), (_smollm2, 8)],
    ids=["tiny-llama-every-question", "smollm2-first-8"],
)
def test_lm_eval_gives_flora_s_prompts_loglikelihoods_and_predictions(
    tmp_path, monkeypatch, torch_single_thread, load, limit
):
    # Prepare: the harness, the data, a local task per subject, and the model in memory
    lm_eval, HFLM, TaskManager = _harness()
    mmlu = _mmlu_folder()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = {subject: _write_task(tmp_path, subject, mmlu) for subject in SUBJECTS}
    model, tokenizer = load()
    model.eval()
    test, dev = load_mmlu("test", SUBJECTS), load_mmlu("dev", SUBJECTS)

    # Execute: lm-eval with per-sample records; flora's scorer on the same questions
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH),
        tasks=list(tasks.values()),
        num_fewshot=SHOTS,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    flora = score_mmlu(
        model, tokenizer, test, dev, shots=SHOTS, limit_per_subject=limit or 0, batch_size=BATCH
    )

    # Assert: question by question, the same prompt, log-likelihoods and prediction
    assert out is not None
    for subject, task in tasks.items():
        questions, shots = test[subject][:limit], dev[subject][:SHOTS]
        samples = sorted(out["samples"][task], key=lambda sample: sample["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(len(questions))), subject
        for sample, question in zip(samples, questions, strict=True):
            arguments = [tuple(a) for a in sample["arguments"]]
            assert arguments == [(format_prompt(question, shots), f" {x}") for x in LETTERS]
        harness = torch.tensor([[r[0] for r in s["filtered_resps"]] for s in samples])  # (N, 4)
        prompts = [build_prompt_ids(tokenizer, q, shots, max_context(model)) for q in questions]
        ours = score_prompts(
            model, prompts, letter_ids(tokenizer), batch_size=BATCH, pad_id=tokenizer.pad_token_id
        )  # (N, 4)
        gap = (harness - ours).abs().max().item()
        assert gap < TOLERANCE, f"{subject}: log-likelihoods differ by up to {gap:.2e}"
        assert harness.argmax(dim=-1).tolist() == flora.predictions[subject], subject
        correct, total = flora.per_subject[subject]
        assert out["results"][task]["acc,none"] == pytest.approx(correct / total), subject
