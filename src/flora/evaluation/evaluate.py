"""`flora eval`'s work: resolve what to evaluate, run the tasks, write eval.json and samples.json.

A target is a run directory (its ``final/model``, held-out data re-derived from its
``config.json``, base model = the config's ``model.name``) or a model spec for ``load_model``
(held-out data from the default data config).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.config import ModelConfig, RunConfig, load_run_config
from flora.data.prompts import Template
from flora.devices import resolve_device, resolve_precision
from flora.errors import FloraError
from flora.evaluation.heldout import heldout_data, heldout_report
from flora.evaluation.mmlu import score_mmlu
from flora.evaluation.mmlu_data import load_mmlu
from flora.evaluation.samples import answer_all, load_mt_bench
from flora.io import atomic_write_json
from flora.models import load_model

__all__ = [
    "TASKS",
    "EvalOptions",
    "Target",
    "evaluate",
    "format_results",
    "parse_tasks",
    "resolve_target",
]

TASKS = ("heldout", "mmlu", "samples")
_BUILTIN = ("smollm2", "tiny-llama")


@dataclass
class Target:
    name: str  # shown, and names the default output folder
    model: str  # what load_model is given
    config: RunConfig  # the run's config, or the defaults for a plain model
    run_dir: Path | None = None

    def default_out(self) -> Path:
        return self.run_dir / "eval" if self.run_dir else Path(f"eval-{self.name}")


@dataclass
class EvalOptions:
    tasks: list[str]
    limit_per_subject: int = 0  # MMLU questions per subject (0: all)
    shots: int = 5
    batch_size: int = 8
    precision: str | None = None  # None: the run's train.precision (fp32 for plain models)
    device: str | None = None  # None: the run's train.device (auto for plain models)
    num_samples: int = 10  # MT-Bench first-turn questions answered
    max_new_tokens: int = 128


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise FloraError(f"--tasks {text!r}: unknown task {unknown}; choose from {','.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def resolve_target(spec: str) -> Target:
    """A run directory, a checkpoint directory, a built-in spec, or a hub id."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "metrics.jsonl").is_file():
        config = load_run_config(path)
        if not (path / "final" / "model" / "config.json").is_file():
            raise FloraError(f"{path}: the run has no final/model yet; finish it with --resume")
        return Target(path.resolve().name, str(path / "final" / "model"), config, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FloraError(f"{path}: neither a flora run directory nor a model checkpoint")
        return Target(path.resolve().name, str(path), RunConfig())
    if spec in _BUILTIN:
        return Target(spec, spec, RunConfig(model=ModelConfig(name=spec)))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FloraError(
            f"{spec}: no such run directory or model; give a run directory, a checkpoint "
            f"directory, a hub id, or one of {', '.join(_BUILTIN)}"
        )
    return Target(spec.replace("/", "--"), spec, RunConfig())


def evaluate(
    target: Target, options: EvalOptions, out: Path, *, quiet: bool = False
) -> dict[str, Any]:
    """Run ``options.tasks`` on ``target``; write out/eval.json (merged with an earlier one)."""
    say: Callable[[str], None] = (lambda _: None) if quiet else print
    config = target.config
    device = resolve_device(options.device or config.train.device, "--device")
    precision = resolve_precision(options.precision or config.train.precision, device)
    start = time.perf_counter()
    model, tokenizer = load_model(
        target.model, precision=precision, seed=config.seed, device=device
    )
    pad_id = int(tokenizer.pad_token_id)
    result: dict[str, Any] = {
        "model": target.model,
        "run_dir": str(target.run_dir) if target.run_dir else None,
        "precision": precision,
        "device": str(device),
    }
    if "heldout" in options.tasks:
        say("held-out loss ...")
        examples = heldout_data(config, tokenizer).heldout
        result["heldout"] = heldout_report(
            model, examples, batch_size=options.batch_size, pad_id=pad_id, precision=precision
        )
    if "mmlu" in options.tasks:
        test, dev = load_mmlu("test"), load_mmlu("dev")
        bar = tqdm(
            total=len(test), desc=f"MMLU {options.shots}-shot", unit="subject", disable=quiet
        )
        mmlu = score_mmlu(
            model,
            tokenizer,
            test,
            dev,
            shots=options.shots,
            limit_per_subject=options.limit_per_subject,
            batch_size=options.batch_size,
            precision=precision,
            progress=lambda _subject: bar.update(1),
        )
        bar.close()
        result["mmlu"] = mmlu.to_dict() | {"limit_per_subject": options.limit_per_subject}
    if "samples" in options.tasks:
        result["samples"] = _samples(target, options, model, tokenizer, precision, out, say)
    result["seconds"] = time.perf_counter() - start
    return _write(out, result)


def _samples(
    target: Target,
    options: EvalOptions,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    precision: str,
    out: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    questions = load_mt_bench(options.num_samples)
    prompts = [q["prompt"] for q in questions]
    template = cast(Template, target.config.data.template)

    def answers(m: PreTrainedModel, t: PreTrainedTokenizerBase) -> list[str]:
        limit = options.max_new_tokens
        return answer_all(
            m, t, prompts, template=template, max_new_tokens=limit, precision=precision
        )

    say(f"answering {len(prompts)} MT-Bench questions ...")
    tuned = answers(model, tokenizer)
    rows = [q | {"answer": a} for q, a in zip(questions, tuned, strict=True)]
    base_name = target.config.model.name if target.run_dir else None
    if base_name is not None:
        say(f"answering them with the base model {base_name} ...")
        device = next(model.parameters()).device
        base_model = load_model(base_name, precision=precision, seed=target.config.seed,
                                device=device)  # fmt: skip
        base = answers(*base_model)
        rows = [
            {k: v for k, v in q.items() if k != "answer"} | {"base": b, "tuned": t}
            for q, b, t in zip(questions, base, tuned, strict=True)
        ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "samples.json", rows)
    return {"file": "samples.json", "count": len(rows), "base": base_name}


def _write(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    path = out / "eval.json"
    merged = dict(result)
    if path.is_file():  # keep the other tasks' results of an earlier eval of the same model
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            earlier = {}
        if isinstance(earlier, dict) and earlier.get("model") == result["model"]:
            merged = {k: v for k, v in earlier.items() if k in TASKS} | result
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, merged)
    return merged


def format_results(result: dict[str, Any], tasks: list[str]) -> str:
    """A short table of this evaluation's figures."""
    lines = []
    if "heldout" in tasks:
        held = result["heldout"]
        lines.append(
            f"held-out  loss {held['loss']:.4f}  ppl {held['perplexity']:.2f}  "
            f"({held['examples']} examples, {held['tokens']} tokens)"
        )
        lines.append(f"  {'category':<24} {'loss':>8} {'ppl':>9} {'n':>5}")
        for name, row in held["per_category"].items():
            lines.append(
                f"  {name:<24} {row['loss']:>8.4f} {row['perplexity']:>9.2f} {row['examples']:>5}"
            )
    if "mmlu" in tasks:
        mmlu = result["mmlu"]
        per = mmlu["limit_per_subject"] or "all"
        lines.append(
            f"MMLU {mmlu['shots']}-shot  macro {mmlu['macro_accuracy']:.2%}  micro "
            f"{mmlu['micro_accuracy']:.2%}  ({mmlu['questions']} questions, {per} per subject, "
            f"{mmlu['questions_per_second']:.2f} q/s)"
        )
    if "samples" in tasks:
        samples = result["samples"]
        side = f" beside base {samples['base']}" if samples["base"] else ""
        lines.append(f"samples   {samples['count']} MT-Bench answers{side} -> {samples['file']}")
    return "\n".join(lines)
