"""`flora eval`: held-out loss per category, k-shot MMLU and MT-Bench samples of a model or run."""

from __future__ import annotations

import argparse
from pathlib import Path

from flora.errors import FloraError

__all__ = ["add_parser", "run"]

DEFAULT_LIMIT_PER_SUBJECT = 20  # see the help text: 1,140 questions, stderr ~1.3 points

_N = DEFAULT_LIMIT_PER_SUBJECT
_HELP = f"""\
Evaluate a finished run (RUN_DIR/final/model) or a model (a checkpoint directory, a hub id, or
smollm2 / tiny-llama). Results go to OUT/eval.json in lm-evaluation-harness's results shape
(merged with an earlier eval of the same model) and a short table is printed.

tasks:
  heldout  loss and perplexity overall and per category on the run's own held-out split
           (re-derived from config.json; default data config for a plain model): flora_heldout
  mmlu     k-shot MMLU, log-likelihood of the answer letter as lm-evaluation-harness scores it;
           headline: the harness's mmlu group, accuracy weighted by subject size with its
           standard error; also its 4 categories, each subject, and the mean over subjects
  samples  greedy answers to the first MT-Bench questions; for a run, beside the base model's
           (OUT/samples.json): flora_samples

MMLU scores the first {_N} test questions of each of the 57 subjects by default ({57 * _N:,} of
14,042, as the harness's --limit {_N} does; the headline's standard error is then near 1.3
points at 25-35% accuracy); --full scores all of them (~2.5 h for SmolLM2-135M on a 2-core
CPU). Every subject has at least 100 test questions, so with a limit of 100 or less each subject
weighs the same and the weighted and macro figures are equal.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a run or model: held-out loss, MMLU, MT-Bench samples",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="MODEL_OR_RUN_DIR", help="run directory or model spec")
    parser.add_argument(
        "--tasks", default="heldout,mmlu,samples", help="comma-separated (default: %(default)s)"
    )
    parser.add_argument("--out", help="output directory (default: RUN_DIR/eval or ./eval-NAME)")
    parser.add_argument(
        "--limit-per-subject",
        type=int,
        default=None,
        help=f"MMLU test questions per subject, the first N (default: {DEFAULT_LIMIT_PER_SUBJECT})",
    )
    parser.add_argument(
        "--subjects",
        help="MMLU: these subjects only, comma-separated, e.g. anatomy,college_physics "
        "(default: all 57)",
    )
    parser.add_argument(
        "--full", action="store_true", help="MMLU: every test question, 14,042 (default: off)"
    )
    parser.add_argument(
        "--shots",
        type=int,
        default=5,
        help="MMLU dev examples in the prompt (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="prompts per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--precision",
        help="fp32, bf16, fp16 or auto (default: the run's train.precision, else fp32)",
    )
    parser.add_argument(
        "--device",
        help="auto, cpu, cuda, cuda:N or mps (default: the run's train.device, else auto)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=10,
        help="MT-Bench questions answered (default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="per sample answer (default: %(default)s)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 can win on busy CPUs)"
    )
    parser.add_argument(
        "--base",
        help="with a run directory: evaluate its final/adapter on this base (a local copy of "
        "the base, a model spec or a hub id) (default: the base the run names)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the table (default: off)")
    parser.set_defaults(handler=run)


def _subjects(text: str | None) -> list[str] | None:
    """``--subjects``, split and checked (None: all)."""
    if text is None:
        return None
    from flora.evaluation.mmlu_data import check_subjects

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise FloraError("--subjects is empty; name MMLU subjects such as anatomy,college_physics")
    return check_subjects(names)


def run(args: argparse.Namespace) -> int:
    from flora.evaluation import EvalOptions, evaluate, format_results, parse_tasks, resolve_target

    tasks = parse_tasks(args.tasks)
    for name in ("shots", "num_samples"):
        if getattr(args, name) < 0:
            raise FloraError(f"--{name.replace('_', '-')} must be >= 0")
    if args.full and args.limit_per_subject is not None:
        raise FloraError("--full scores every question: drop --limit-per-subject, or --full")
    if args.limit_per_subject is None:
        args.limit_per_subject = DEFAULT_LIMIT_PER_SUBJECT
    if args.limit_per_subject < 1:
        raise FloraError("--limit-per-subject must be >= 1 (--full scores every question)")
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise FloraError(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise FloraError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    target = resolve_target(args.target, base=args.base)
    out = Path(args.out) if args.out else target.default_out()
    options = EvalOptions(
        tasks=tasks,
        limit_per_subject=0 if args.full else args.limit_per_subject,
        shots=args.shots,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        subjects=_subjects(args.subjects),
    )
    result = evaluate(target, options, out, quiet=args.quiet)
    config = result["config"]
    where = f"{config['precision']} on {config['device']}"
    print(f"eval of {config['model']} ({where}) -> {out / 'eval.json'}")
    print(format_results(result, tasks))
    return 0
