"""The MMLU scorer: prompts as the harness writes them, log-probs equal to a slow per-choice
forward pass, the gather of the right letter ids, truncation, the per-subject limit. The figures
themselves: test_mmlu_results.py."""

from __future__ import annotations

import json

import pytest
import torch

from flora.data.sources import find_shared_data
from flora.errors import FloraError
from flora.evaluation.mmlu import (
    build_prompt_ids,
    common_prefix,
    letter_ids,
    score_mmlu,
    score_prompts,
)
from flora.evaluation.mmlu_data import Question, format_prompt, load_mmlu

SHOTS = [
    Question("high_school_physics", "What is 1 + 1?", ("1", "2", "3", "4"), 1),
    Question("high_school_physics", "Which is a fruit?", ("car", "stone", "apple", "sky"), 2),
]
TEST = [
    Question("high_school_physics", "What falls?", ("up", "nothing", "light", "a dropped ball"), 3),
    Question(
        "high_school_physics", "Speed of light, roughly?", ("3e8 m/s", "1 m/s", "c^2", "0"), 0
    ),
    Question(
        "high_school_physics",
        "A long question that goes on and on about units, vectors and forces at length?",
        ("newtons", "metres", "seconds", "kelvin"),
        0,
    ),
    Question("high_school_physics", "Mass unit?", ("kg", "m", "s", "A"), 0),
    Question("high_school_physics", "Is ice cold?", ("no", "yes", "maybe", "never"), 1),
]


def _slow_logprobs(model, tokenizer, prompt: str) -> torch.Tensor:
    """An independent reference: one forward pass per choice over prompt + " X"."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for letter in "ABCD":
        (token,) = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[*ids, token]])).logits  # (1, T + 1, V)
        out.append(torch.log_softmax(logits[0, -2].float(), dim=-1)[token])
    return torch.stack(out)


def test_prompt_is_the_harness_format():
    # Execute
    prompt = format_prompt(TEST[0], SHOTS[:1])
    # Assert
    assert prompt == (
        "The following are multiple choice questions (with answers) about high school physics."
        "\n\nWhat is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What falls?\nA. up\nB. nothing\nC. light\nD. a dropped ball\nAnswer:"
    )


def test_letter_ids_are_single_tokens(tokenizer):
    ids = letter_ids(tokenizer)
    assert len(set(ids)) == 4
    assert [tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D"]


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_scores_equal_a_slow_forward_per_choice(
    tiny_model, tokenizer, torch_single_thread, prefix_cache, batch_size
):
    # Prepare: the reference log-probs and predictions, one forward pass per choice
    tiny_model.eval()
    expected = torch.stack(
        [_slow_logprobs(tiny_model, tokenizer, format_prompt(q, SHOTS)) for q in TEST]
    )
    prompts = [build_prompt_ids(tokenizer, q, SHOTS, 512) for q in TEST]
    # Execute
    scored = score_prompts(
        tiny_model,
        prompts,
        letter_ids(tokenizer),
        batch_size=batch_size,
        pad_id=tokenizer.pad_token_id,
        prefix_cache=prefix_cache,
    )
    result = score_mmlu(
        tiny_model,
        tokenizer,
        {"high_school_physics": TEST},
        {"high_school_physics": SHOTS},
        shots=2,
        batch_size=batch_size,
        prefix_cache=prefix_cache,
    )
    # Assert
    torch.testing.assert_close(scored, expected, atol=1e-4, rtol=1e-4)
    predicted = expected.argmax(dim=-1).tolist()
    assert result.predictions["high_school_physics"] == predicted
    correct = sum(p == q.answer for p, q in zip(predicted, TEST, strict=True))
    assert result.per_subject == {"high_school_physics": (correct, len(TEST))}
    assert result.scores()["mmlu"].acc == pytest.approx(correct / len(TEST))


def test_the_forced_letter_wins_everywhere(tiny_model, tokenizer, torch_single_thread):
    # Prepare: lift the logit of " C" far above every other token
    c_id = letter_ids(tokenizer)[2]
    bump = torch.zeros(len(tokenizer))
    bump[c_id] = 1e4
    tiny_model.lm_head.register_forward_hook(lambda _m, _i, output: output + bump)
    # Execute
    result = score_mmlu(
        tiny_model, tokenizer, {"physics": TEST}, {"physics": SHOTS}, shots=2, batch_size=3
    )
    # Assert
    assert result.predictions["physics"] == [2] * len(TEST)
    assert result.per_subject["physics"] == (sum(q.answer == 2 for q in TEST), len(TEST))


def test_long_prompts_lose_shots_then_tokens_from_the_left(tokenizer):
    # Prepare
    full = build_prompt_ids(tokenizer, TEST[0], SHOTS, 10_000)
    no_shots = build_prompt_ids(tokenizer, TEST[0], [], 10_000)
    one_shot = build_prompt_ids(tokenizer, TEST[0], SHOTS[1:], 10_000)
    # Execute
    fits_one = build_prompt_ids(tokenizer, TEST[0], SHOTS, len(one_shot))
    cut = build_prompt_ids(tokenizer, TEST[0], SHOTS, len(no_shots) - 5)
    # Assert
    assert len(full) > len(one_shot) > len(no_shots)
    assert fits_one == one_shot  # the first (leftmost) shot went, the second stayed
    assert cut == no_shots[5:]


def test_scoring_truncated_prompts_stays_within_the_context(
    tiny_model, tokenizer, torch_single_thread
):
    # Prepare: shots far longer than the tiny model's 512 positions
    long_shot = Question("physics", "word " * 600, ("a", "b", "c", "d"), 0)
    # Execute
    result = score_mmlu(
        tiny_model, tokenizer, {"physics": TEST[:2]}, {"physics": [long_shot]}, shots=1
    )
    # Assert
    assert result.per_subject["physics"][1] == 2


def test_common_prefix_leaves_every_prompt_a_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert common_prefix([[1, 2], [1, 2, 3]]) == 1
    assert common_prefix([[7, 8, 9]]) == 2
    assert common_prefix([[1], [2]]) == 0


def test_the_limit_scores_the_first_questions_and_counts_them_all(
    tiny_model, tokenizer, torch_single_thread
):
    # Prepare: " C" forced, so the predictions say which questions were scored
    c_id = letter_ids(tokenizer)[2]
    bump = torch.zeros(len(tokenizer))
    bump[c_id] = 1e4
    tiny_model.lm_head.register_forward_hook(lambda _m, _i, output: output + bump)
    # Execute
    result = score_mmlu(
        tiny_model, tokenizer, {"physics": TEST}, {"physics": SHOTS}, shots=1, limit_per_subject=2
    )
    # Assert: the first two questions (answers 3 and 0: none is C), out of five
    assert result.per_subject == {"physics": (0, 2)} and result.available == {"physics": 5}
    assert result.harness()["n-samples"]["mmlu_physics"] == {"original": 5, "effective": 2}
    with pytest.raises(FloraError, match="no question was scored"):
        score_mmlu(tiny_model, tokenizer, {"physics": []}, {"physics": SHOTS}, shots=1)


def test_shared_mmlu_copy_loads_every_subject():
    if find_shared_data("mmlu/dev/abstract_algebra_dev.csv") is None:
        pytest.skip("shared MMLU copy not found (set FLORA_DATA_DIR)")
    dev, test = load_mmlu("dev"), load_mmlu("test")
    assert len(dev) == len(test) == 57
    assert all(len(questions) == 5 for questions in dev.values())
    assert sum(len(questions) for questions in test.values()) == 14042
    assert test["abstract_algebra"][0].subject == "abstract_algebra"


def test_a_bf16_base_scores_mmlu_like_the_fp32_one(torch_single_thread):
    """model.dtype = "bf16" holds the head in bf16: its rows are upcast to fp32 for the scores."""
    from flora.models import load_model

    fp32, tokenizer = load_model("tiny-llama")  # the tiny models' own (shipped) tokenizer
    bf16, _ = load_model("tiny-llama", dtype="bf16", precision="bf16")
    test, shots = {"physics": TEST}, {"physics": SHOTS}
    scores = {
        name: score_mmlu(m, tokenizer, test, shots, shots=2, batch_size=3, precision="bf16")
        for name, m in (("fp32", fp32), ("bf16", bf16))
    }
    assert scores["bf16"].per_subject["physics"][1] == len(TEST)
    assert scores["bf16"].predictions == scores["fp32"].predictions


def test_a_subject_missing_from_the_data_folder_is_one_line_never_a_download(tmp_path, monkeypatch):
    # Prepare: a data folder with two subjects' CSVs
    from flora.errors import FloraError
    from flora.evaluation.mmlu_data import load_mmlu

    header = "question,choice0,choice1,choice2,choice3,answer\n"
    for subject in ("anatomy", "astronomy"):
        folder = tmp_path / "mmlu" / "test"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{subject}_test.csv").write_text(header + "Q?,a,b,c,d,2\n")
    monkeypatch.setenv("FLORA_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    # Execute / Assert: the two load; all 57 name the missing ones; an unknown one is refused
    got = load_mmlu("test", ["astronomy", "anatomy"])
    assert list(got) == ["anatomy", "astronomy"] and got["anatomy"][0].answer == 2
    with pytest.raises(FloraError, match="no test CSV for MMLU subject.*abstract_algebra"):
        load_mmlu("test")
    with pytest.raises(FloraError, match="'anatomyy' is not an MMLU subject"):
        load_mmlu("test", ["anatomyy"])


def test_eval_subjects_scores_those_only(tmp_path, capsys):
    from flora.cli import main

    if find_shared_data("mmlu/dev/abstract_algebra_dev.csv") is None:
        pytest.skip("no shared MMLU copy")
    args = ["eval", "tiny-llama", "--tasks", "mmlu", "--subjects", "anatomy,astronomy"]
    assert main([*args, "--limit-per-subject", "2", "--out", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert {"mmlu_anatomy", "mmlu_astronomy"} <= set(results)
    assert "mmlu_abstract_algebra" not in results
    assert main(["eval", "tiny-llama", "--subjects", "nope"]) == 2
