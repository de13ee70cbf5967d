"""`flora eval`'s work: resolve what to evaluate, run the tasks, write eval.json and samples.json.

A target is a run directory (its ``final/model``, held-out data re-derived from its
``config.json``, base model = the config's ``model.name``) or a model spec for ``load_model``
(held-out data from the default data config).
"""

from __future__ import annotations

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
from flora.evaluation.mmlu import MMLUResult, score_mmlu
from flora.evaluation.mmlu_data import load_mmlu
from flora.evaluation.results import (
    HELDOUT,
    SAMPLES,
    SECTIONS,
    heldout_sections,
    merge,
    read_eval,
    samples_sections,
)
from flora.evaluation.samples import answer_all, load_mt_bench
from flora.io import atomic_write_json
from flora.models import load_base, load_model

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
    adapter: Path | None = None  # a run without final/model: its final/adapter, merged on load

    def default_out(self) -> Path:
        return self.run_dir / "eval" if self.run_dir else Path(f"eval-{self.name}")


@dataclass
class EvalOptions:
    tasks: list[str]
    limit_per_subject: int = 0  # MMLU questions per subject (0: all; `flora eval` defaults to 20)
    shots: int = 5
    batch_size: int = 8
    precision: str | None = None  # None: the run's train.precision (fp32 for plain models)
    device: str | None = None  # None: the run's train.device (auto for plain models)
    num_samples: int = 10  # MT-Bench first-turn questions answered
    max_new_tokens: int = 128
    subjects: list[str] | None = None  # MMLU subjects (None: all 57)


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise FloraError(f"--tasks {text!r}: unknown task {unknown}; choose from {','.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def resolve_target(spec: str, base: str | None = None) -> Target:
    """A run directory, a checkpoint directory, a built-in spec, or a hub id. ``base``: a run
    directory's final/adapter on that base (a local copy, a spec or a hub id)."""
    path = Path(spec).expanduser()
    if base is not None and not (path.is_dir() and (path / "metrics.jsonl").is_file()):
        raise FloraError(f"--base {base!r} applies to a run directory's adapter; {spec} is not one")
    if path.is_dir() and (path / "metrics.jsonl").is_file():
        config = load_run_config(path)
        name, final = path.resolve().name, path / "final"
        if base is not None:
            if not (final / "adapter" / "adapter_config.json").is_file():
                raise FloraError(f"{path}: no final/adapter to put on --base; finish the run")
            return Target(name, base, config, path, adapter=final / "adapter")
        if (final / "model" / "config.json").is_file():
            return Target(name, str(final / "model"), config, path)
        if (final / "adapter" / "adapter_config.json").is_file():  # output.model = false
            return Target(name, config.model.name, config, path, adapter=final / "adapter")
        raise FloraError(
            f"{path}: the run has no final/model or final/adapter yet; finish it "
            "with flora run --resume"
        )
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
    """Run ``options.tasks`` on ``target``; write out/eval.json (merged with an earlier one of
    the same model) in lm-evaluation-harness's results shape (flora.evaluation.results)."""
    say: Callable[[str], None] = (lambda _: None) if quiet else print
    config = target.config
    device = resolve_device(options.device or config.train.device, "--device")
    precision = resolve_precision(options.precision or config.train.precision, device)
    started, start = time.time(), time.perf_counter()
    model, tokenizer = load_base(target.model, precision=precision, seed=config.seed, device=device)
    if target.adapter is not None:  # the run's base plus its whole update
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, target.adapter).merge_and_unload()
    pad_id = int(tokenizer.pad_token_id)
    sections: list[dict[str, dict[str, Any]]] = []
    timings: dict[str, dict[str, float]] = {}
    if "heldout" in options.tasks:
        say("held-out loss ...")
        begun = time.perf_counter()
        examples = heldout_data(config, tokenizer).heldout
        report = heldout_report(
            model, examples, batch_size=options.batch_size, pad_id=pad_id, precision=precision
        )
        sections.append(heldout_sections(report))
        timings["heldout"] = {"seconds": time.perf_counter() - begun}
    if "mmlu" in options.tasks:
        mmlu = _mmlu(model, tokenizer, options, precision, quiet)
        sections.append(mmlu.harness())
        timings["mmlu"] = {
            "seconds": mmlu.seconds,
            "questions": mmlu.questions,
            "questions_per_second": mmlu.questions_per_second,
        }
    if "samples" in options.tasks:
        begun = time.perf_counter()
        samples = _samples(target, options, model, tokenizer, precision, out, say)
        sections.append(samples_sections(samples["file"], samples["count"], samples["base"]))
        timings["samples"] = {"seconds": time.perf_counter() - begun}
    fresh: dict[str, Any] = {
        section: {key: value for part in sections for key, value in part.get(section, {}).items()}
        for section in SECTIONS
    }
    fresh["config"] = {
        "model": target.model,
        "run_dir": str(target.run_dir) if target.run_dir else None,
        "batch_size": options.batch_size,
        "device": str(device),
        "precision": precision,
        "limit": options.limit_per_subject or None,  # MMLU questions per subject; None: all
        "random_seed": config.seed,
    }
    fresh["timings"] = timings
    fresh["date"] = started
    fresh["total_evaluation_time_seconds"] = str(time.perf_counter() - start)
    return _write(out, fresh, options.tasks)


def _mmlu(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    options: EvalOptions,
    precision: str,
    quiet: bool,
) -> MMLUResult:
    test, dev = load_mmlu("test", options.subjects), load_mmlu("dev", options.subjects)
    bar = tqdm(total=len(test), desc=f"MMLU {options.shots}-shot", unit="subject", disable=quiet)
    try:
        return score_mmlu(
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
    finally:
        bar.close()


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
        base_model = load_model(
            base_name, precision=precision, seed=target.config.seed, device=device
        )
        base = answers(*base_model)
        rows = [
            {k: v for k, v in q.items() if k != "answer"} | {"base": b, "tuned": t}
            for q, b, t in zip(questions, base, tuned, strict=True)
        ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "samples.json", rows)
    return {"file": "samples.json", "count": len(rows), "base": base_name}


def _write(out: Path, fresh: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    path = out / "eval.json"
    merged = merge(_earlier(path, fresh["config"]["model"]), fresh, tasks)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, merged)
    return merged


def _earlier(path: Path, model: str) -> dict[str, Any] | None:
    """An earlier eval.json of ``model`` to merge with; None (it is replaced) when there is none,
    it holds another model, or it is not in the harness shape (an older flora wrote it)."""
    try:
        earlier = read_eval(path, "")
    except FloraError:
        return None
    same = isinstance(earlier.get("config"), dict) and earlier["config"].get("model") == model
    return earlier if same else None


def _pct(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, float) else str(value)


def _pm(entry: dict[str, Any]) -> str:
    """ "24.12% +- 1.27" (the stderr in percentage points), or "24.12% +- N/A"."""
    stderr = entry["acc_stderr,none"]
    spread = f"{stderr * 100:.2f}" if isinstance(stderr, float) else str(stderr)
    return f"{entry['acc,none']:.2%} +- {spread}"


def format_results(result: dict[str, Any], tasks: list[str]) -> str:
    """A short table of this evaluation's figures."""
    results, lines = result["results"], []
    if "heldout" in tasks:
        held = results[HELDOUT]
        lines.append(
            f"held-out  loss {held['loss,none']:.4f}  ppl {held['perplexity,none']:.2f}  "
            f"({held['sample_len']} examples, {held['tokens']} tokens)"
        )
        lines.append(f"  {'category':<24} {'loss':>8} {'ppl':>9} {'n':>5}")
        for name in result["group_subtasks"][HELDOUT]:
            row = results[name]
            lines.append(
                f"  {row['alias']:<24} {row['loss,none']:>8.4f} {row['perplexity,none']:>9.2f} "
                f"{row['sample_len']:>5}"
            )
    if "mmlu" in tasks:
        mmlu, speed = results["mmlu"], result["timings"]["mmlu"]
        per = result["config"]["limit"] or "all"
        lines.append(
            f"MMLU {result['n-shot']['mmlu']}-shot  acc {_pm(mmlu)} (weighted by subject size)  "
            f"macro {_pct(mmlu['acc_macro,none'])}  ({mmlu['sample_len']} questions, {per} per "
            f"subject, {speed['questions_per_second']:.2f} q/s)"
        )
        for group in result["group_subtasks"]["mmlu"]:
            if group in result.get("groups", {}):
                row = results[group]
                lines.append(f"  {row['alias']:<16} {_pm(row):>18}  ({row['sample_len']})")
    if "samples" in tasks:
        samples = results[SAMPLES]
        side = f" beside base {samples['base']}" if samples["base"] else ""
        count, file = samples["sample_len"], samples["file"]
        lines.append(f"samples   {count} MT-Bench answers{side} -> {file}")
    return "\n".join(lines)
