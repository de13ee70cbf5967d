"""One run directory boiled down to what `flora compare` tables and plots.

Reads config.json (method, ranks), metrics.jsonl (client rows: bytes; server rows: noise, round
seconds, held-out loss when eval.every is set; eval rows: held-out loss before and after),
summary.json (wall seconds) and, when `flora eval` has run, eval/eval.json (MMLU, per-category
held-out loss). Without eval/eval.json, MMLU is the run's own last ``mmlu`` row (eval.mmlu).
MMLU is lm-evaluation-harness's ``mmlu`` figure: accuracy weighted by subject size, with its
standard error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora.config import RANK_PROFILES
from flora.errors import FloraError
from flora.evaluation.results import HELDOUT, metric, read_eval
from flora.metrics import read_metrics

__all__ = ["RunSummary", "format_ranks", "summarize_run"]


@dataclass
class RunSummary:
    name: str
    method: str
    ranks: str
    final_loss: float | None
    mmlu: float | None  # weighted acc: eval/eval.json, else the run's last mmlu row
    bytes_up: int  # sum over client rows
    bytes_down: int
    seconds: float | None  # summary.json, else the sum of round_seconds
    noise: float | None  # mean aggregation noise over server rows
    loss_by_round: list[tuple[int, float]] = field(default_factory=list)
    loss_by_downlink: list[tuple[int, float]] = field(default_factory=list)  # cumulative bytes
    per_category: dict[str, float] = field(default_factory=dict)  # from eval/eval.json
    mmlu_by_round: list[tuple[int, float]] = field(default_factory=list)  # the run's mmlu rows
    mmlu_stderr: float | None = None  # the standard error of ``mmlu`` (None: "N/A" or none)
    mmlu_source: str = ""  # where ``mmlu`` comes from, and on how many questions
    centralized: bool = False  # one client: no communication, no aggregation
    before_loss: float | None = None  # the round-0 held-out loss (the base model)
    # per category: (base model's loss, final model's loss), from the run's eval rows
    category_change: dict[str, tuple[float, float]] = field(default_factory=dict)
    setup: str = ""  # a one-line summary of the config


def format_ranks(ranks: list[int]) -> str:
    """[64, 32, 16, 16, 4, 4, 4] -> "64,32,2x16,3x4"."""
    parts: list[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j < len(ranks) and ranks[j] == ranks[i]:
            j += 1
        parts.append(f"{j - i}x{ranks[i]}" if j - i > 1 else str(ranks[i]))
        i = j
    return ",".join(parts)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise FloraError(f"{path}: not valid JSON; rewrite or remove it") from None
    return data if isinstance(data, dict) else {}


def _ranks(config: dict[str, Any]) -> str:
    ranks = config.get("lora", {}).get("ranks", [])
    listed = RANK_PROFILES.get(ranks, []) if isinstance(ranks, str) else list(ranks)
    if config.get("federation", {}).get("centralized"):
        return f"{max(listed)} (centralized)" if listed else "centralized"
    return format_ranks([int(r) for r in listed]) if listed else "?"


def _curves(rows: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    losses: dict[int, float] = {}
    for row in rows:
        if row.get("kind") == "server" and row.get("heldout_loss") is not None:
            losses[int(row["round"])] = float(row["heldout_loss"])
    for row in rows:  # eval rows win: they are the before/after figures
        if row.get("kind") == "eval" and row.get("heldout_loss") is not None:
            losses[int(row["round"])] = float(row["heldout_loss"])
    down_by_round: dict[int, int] = {}
    for row in rows:
        if row.get("kind") == "client":
            r = int(row["round"])
            down_by_round[r] = down_by_round.get(r, 0) + int(row.get("bytes_down") or 0)
    by_round = sorted(losses.items())
    by_bytes = [(sum(b for r, b in down_by_round.items() if r <= t), loss) for t, loss in by_round]
    return by_round, by_bytes


def summarize_run(run_dir: Path, name: str | None = None) -> RunSummary:
    """Read one run directory; FloraError when it is not one."""
    if not (run_dir / "metrics.jsonl").is_file():
        raise FloraError(f"{run_dir}: no metrics.jsonl; is it a flora run directory?")
    config = _read_json(run_dir / "config.json")
    rows = read_metrics(run_dir / "metrics.jsonl")
    clients = [r for r in rows if r.get("kind") == "client"]
    servers = [r for r in rows if r.get("kind") == "server"]
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("heldout_loss") is not None]
    final = next((r for r in evals if r.get("final")), None)  # None: the run is unfinished
    summary = _read_json(run_dir / "summary.json")
    seconds = summary.get("seconds")
    if seconds is None and servers:
        seconds = sum(float(r.get("round_seconds") or 0.0) for r in servers)
    noises = [float(r["noise"]) for r in servers if r.get("noise") is not None]
    evaluation = read_eval(run_dir / "eval" / "eval.json", f"re-run `flora eval {run_dir}`")
    mmlu_rows = [r for r in rows if r.get("kind") == "mmlu"]
    mmlu = metric(evaluation, "mmlu", "acc")
    stderr = metric(evaluation, "mmlu", "acc_stderr")
    source = ""
    if mmlu is not None:
        source = f"flora eval, {_questions(evaluation)} questions"
    elif mmlu_rows:
        last = mmlu_rows[-1]
        mmlu, stderr = _row_acc(run_dir, last), last.get("acc_stderr")
        count = last.get("questions", "?")
        source = f"in-run eval.mmlu after round {last.get('round')}, {count} questions"
    results = evaluation.get("results", {})
    per_category = {
        results[n]["alias"]: results[n]["loss,none"]
        for n in evaluation.get("group_subtasks", {}).get(HELDOUT, [])
    }
    by_round, by_bytes = _curves(rows)
    federation = config.get("federation", {})
    first = next((r for r in evals if int(r["round"]) == 0), None)
    change = {}
    if first and final and first.get("per_category") and final.get("per_category"):
        after = final["per_category"]
        change = {
            k: (float(v), float(after[k])) for k, v in first["per_category"].items() if k in after
        }
    return RunSummary(
        name=name or run_dir.resolve().name,
        method="centralized" if federation.get("centralized") else federation.get("method", "?"),
        ranks=_ranks(config),
        final_loss=float(final["heldout_loss"]) if final else None,
        mmlu=float(mmlu) if mmlu is not None else None,
        bytes_up=sum(int(r.get("bytes_up") or 0) for r in clients),
        bytes_down=sum(int(r.get("bytes_down") or 0) for r in clients),
        seconds=float(seconds) if seconds is not None else None,
        noise=sum(noises) / len(noises) if noises else None,
        loss_by_round=by_round,
        loss_by_downlink=by_bytes,
        per_category={k: float(v) for k, v in per_category.items()},
        mmlu_by_round=sorted((int(r["round"]), _row_acc(run_dir, r)) for r in mmlu_rows),
        mmlu_stderr=float(stderr) if mmlu is not None and stderr is not None else None,
        mmlu_source=source,
        centralized=bool(federation.get("centralized")),
        before_loss=float(first["heldout_loss"]) if first else None,
        category_change=change,
        setup=_setup(config),
    )


def _questions(evaluation: dict[str, Any]) -> str:
    """MMLU questions scored in an eval.json (its n-samples), or "?"."""
    samples = evaluation.get("n-samples", {})
    counts = [v.get("effective") for k, v in samples.items() if k.startswith("mmlu_")]
    return f"{sum(counts):,}" if counts and all(isinstance(c, int) for c in counts) else "?"


def _setup(config: dict[str, Any]) -> str:
    """'smollm2 (q_proj,v_proj), 10 clients, 2 rounds x 5 steps, batch 4, lr 0.0005, dirichlet
    alpha 1.0, max_length 160, 2000 rows'."""
    if not config:
        return ""
    model, data = config.get("model", {}), config.get("data", {})
    federation, train = config.get("federation", {}), config.get("train", {})
    targets = ",".join(model.get("target_modules") or []) or "default targets"
    clients = (
        "1 client (centralized)"
        if federation.get("centralized")
        else f"{federation.get('num_clients', '?')} clients"
    )
    fraction = federation.get("fraction", 1.0)
    if fraction not in (None, 1.0):
        clients += f" ({fraction:.0%} a round)"
    scheme = data.get("partition", "?")
    if scheme == "dirichlet":
        scheme += f" alpha {data.get('dirichlet_alpha')}"
    rows = data.get("limit") or "all"
    return (
        f"{model.get('name', '?')} ({targets}), {clients}, {federation.get('rounds', '?')} "
        f"rounds x {train.get('max_steps', '?')} steps, batch {train.get('batch_size', '?')}, "
        f"lr {train.get('lr', '?')}, {scheme}, max_length {data.get('max_length', '?')}, "
        f"{rows} rows"
    )


def _row_acc(run_dir: Path, row: dict[str, Any]) -> float:
    """An mmlu row's weighted accuracy; rows written before flora followed the harness call it
    ``micro_accuracy`` (correct over questions: the same figure)."""
    value = row.get("acc", row.get("micro_accuracy"))
    if not isinstance(value, int | float):
        where = f"{run_dir}/metrics.jsonl: the mmlu row of round {row.get('round')}"
        raise FloraError(f"{where} has no acc; leave this run out")
    return float(value)
