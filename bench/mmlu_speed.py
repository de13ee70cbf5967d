"""MMLU scoring speed: flora's log-likelihood scorer against the generate-and-parse baseline.

Baselines: the FLoRA reference code's MMLU evaluation (ATP-1010/FederatedLLM,
fed_utils/evaluation.py) generates an answer per question, one question at a time, up to 32 new
tokens, and parses it. Two generate-and-parse baselines run here, both greedy (the reference
samples at temperature 0.2, which costs the same), on the same k-shot prompts as the scorer:
"reference" as the reference does it (batch 1, up to --ref-tokens new tokens, stopping at EOS),
and a stronger one, batched with left padding and only --gen-tokens new tokens. The prediction
is the first standalone A-D letter of the answer (none: wrong).

Contender: `flora.evaluation.score_mmlu`, the same k-shot prompts and questions, one forward pass
per batch reading the log-probs of " A".." D" at the last prompt position, with the subject's
shared few-shot prefix run once (its KV cache reused), and also without that prefix cache.

All of them use the same model (SmolLM2-135M-Instruct), questions (first --limit-per-subject of
every subject), shots, batch size and precision. Figures: questions/s (prompt building and
scoring, model loading excluded) and the ratio to the baseline; plus how often the predictions
agree. The scorers take turns subject by subject (rotating order), so a shared machine's load
falls on all of them alike; ratios within one run are what count. On a busy CPU try --threads 1.

    .venv/bin/python bench/mmlu_speed.py                          # 2 per subject, 57 subjects
    .venv/bin/python bench/mmlu_speed.py --limit-per-subject 4 --subjects 19   # ~12 min
    .venv/bin/python bench/mmlu_speed.py --limit-per-subject 1 --subjects 20   # quicker

Measured (4 per subject, 19 subjects, fp32, 2 threads): 1.58 q/s, 5.34x the reference and 3.07x
the batched baseline, the same predictions for all.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.evaluation.mmlu import build_prompt_ids, max_context, score_mmlu
from flora.evaluation.mmlu_data import LETTERS, Question, load_mmlu
from flora.evaluation.mmlu_results import summarize
from flora.models import autocast_context, load_model, resolve_precision

Scored = tuple[dict[str, tuple[int, int]], dict[str, list[int]], float]
Scorer = Callable[[dict[str, list[Question]]], Scored]
_LETTER = re.compile(r"\b([ABCD])\b")


def parse_letter(text: str) -> int:
    """Index of the first standalone A-D letter in ``text``; -1 when there is none."""
    match = _LETTER.search(text)
    return LETTERS.index(match.group(1)) if match else -1


def generate_scorer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    test: dict[str, list[Question]],
    dev: dict[str, list[Question]],
    *,
    shots: int,
    batch_size: int,
    precision: str,
    new_tokens: int,
) -> Scored:
    """(per subject (correct, total), predictions, seconds) by greedy generation + parsing."""
    pad_id = int(tokenizer.pad_token_id)
    length = max_context(model) - new_tokens
    model.eval()
    per_subject, predictions = {}, {}
    start = time.perf_counter()
    for subject, questions in test.items():
        prompts = [build_prompt_ids(tokenizer, q, dev[subject][:shots], length) for q in questions]
        predicted: list[int] = []
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T) left-padded
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(chunk):
                ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            with torch.no_grad(), autocast_context(precision):
                out = model.generate(  # type: ignore[operator]
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            for row in out[:, width:]:
                predicted.append(parse_letter(str(tokenizer.decode(row, skip_special_tokens=True))))
        correct = sum(int(p == q.answer) for p, q in zip(predicted, questions, strict=True))
        per_subject[subject], predictions[subject] = (correct, len(questions)), predicted
    return per_subject, predictions, time.perf_counter() - start


def _agreement(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    pairs = [(x, y) for s in a for x, y in zip(a[s], b[s], strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-per-subject", type=int, default=2)
    parser.add_argument("--subjects", type=int, default=0, help="N evenly spaced (0: all 57)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or auto")
    parser.add_argument("--gen-tokens", type=int, default=8, help="batched baseline's tokens")
    parser.add_argument("--ref-tokens", type=int, default=32, help="reference's new tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", type=Path, help="write the figures here (make bench)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision)
    model, tokenizer = load_model("smollm2")
    test_all, dev = load_mmlu("test"), load_mmlu("dev")
    everything = sorted(test_all)
    step = len(everything) / (args.subjects or len(everything))
    names = [everything[int(i * step)] for i in range(args.subjects or len(everything))]
    test = {s: test_all[s][: args.limit_per_subject] for s in names}
    n = sum(len(q) for q in test.values())
    print(
        f"{n} questions ({len(test)} subjects x {args.limit_per_subject}), {args.shots}-shot, "
        f"batch {args.batch_size}, {precision}, {torch.get_num_threads()} threads"
    )
    common = {"shots": args.shots, "batch_size": args.batch_size, "precision": precision}

    def loglik(cache: bool) -> Scorer:
        def score(subject: dict[str, list[Question]]) -> Scored:
            result = score_mmlu(model, tokenizer, subject, dev, prefix_cache=cache, **common)
            return result.per_subject, result.predictions, result.seconds

        return score

    def generate(subject: dict[str, list[Question]]) -> Scored:
        return generate_scorer(model, tokenizer, subject, dev, new_tokens=args.gen_tokens, **common)

    def reference(subject: dict[str, list[Question]]) -> Scored:
        return generate_scorer(
            model,
            tokenizer,
            subject,
            dev,
            new_tokens=args.ref_tokens,
            **(common | {"batch_size": 1}),
        )

    scorers: dict[str, Scorer] = {
        "loglik + prefix cache": loglik(True),
        "loglik, no prefix cache": loglik(False),
        f"generate {args.gen_tokens} tok, batched": generate,
        f"reference: 1 q, {args.ref_tokens} tok": reference,
    }
    for score in scorers.values():  # first calls pay one-off costs; keep them out
        score({names[0]: test[names[0]][:1]})
    totals: dict[str, Scored] = {name: ({}, {}, 0.0) for name in scorers}
    for k, subject in enumerate(names):  # interleaved, rotating order: same load for all
        order = list(scorers)[k % len(scorers) :] + list(scorers)[: k % len(scorers)]
        for name in order:
            per_subject, predictions, seconds = scorers[name]({subject: test[subject]})
            totals[name][0].update(per_subject)
            totals[name][1].update(predictions)
            totals[name] = (totals[name][0], totals[name][1], totals[name][2] + seconds)
    _print(totals, n)
    if args.json:
        names = list(totals)
        reference, batched = totals[names[-1]][2], totals[names[-2]][2]
        figures = {
            f"MMLU scoring speed, {names[0]}": {
                "value": reference / totals[names[0]][2],
                "unit": "x",
                "goal": None,
                "baseline": f"{names[-1]} (generate and parse, lm-eval style), questions/s",
            },
            f"MMLU scoring speed against batched generation, {names[0]}": {
                "value": batched / totals[names[0]][2],
                "unit": "x",
                "goal": None,
                "baseline": f"{names[-2]}, questions/s",
            },
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def _print(totals: dict[str, Scored], n: int) -> None:
    names = list(totals)
    batched, reference = totals[names[-2]], totals[names[-1]]
    print(
        f"{'scorer':<28} {'q/s':>7} {'x reference':>11} {'x batched':>9} {'acc':>6} "
        f"{'macro':>6} {'agree':>6}"
    )
    for name, (per_subject, predictions, seconds) in totals.items():
        acc = summarize(per_subject)
        print(
            f"{name:<28} {n / seconds:>7.3f} {reference[2] / seconds:>11.2f} "
            f"{batched[2] / seconds:>9.2f} {acc.acc:>6.3f} "
            f"{acc.acc_macro:>6.3f} {_agreement(predictions, reference[1]):>6.2f}"
        )
    cached, uncached = totals[names[0]][1], totals[names[1]][1]
    print(
        f"(agree: predictions equal to the reference's; cache vs no cache: "
        f"{_agreement(cached, uncached):.2f})"
    )


if __name__ == "__main__":
    main()
