"""eval.json in lm-evaluation-harness's results shape: its sections, merging, reading.

```
{"results": {task: {"name", "alias", "sample_len", "<metric>,none", "<metric>_stderr,none"}},
 "groups": {group: ...as results}, "group_subtasks": {group: [task, ...]},
 "configs": {task: {...}}, "versions", "n-shot", "higher_is_better",
 "n-samples": {task: {"original", "effective"}},
 "config": {"model", "batch_size", "device", "limit", ...},
 "total_evaluation_time_seconds": "123.4", "timings": {flora task: {"seconds", ...}}}
```

MMLU tasks are named as the harness names them (``mmlu``, ``mmlu_stem`` ..., ``mmlu_<subject>``,
:mod:`flora.evaluation.mmlu_results`). flora's own tasks: ``flora_heldout`` ("loss,none",
"perplexity,none", "tokens") with one subtask ``flora_heldout_<category>`` per category, and
``flora_samples`` (the MT-Bench answers file). ``timings`` is flora's: the harness has one total.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flora.errors import FloraError

__all__ = [
    "HELDOUT",
    "SAMPLES",
    "SECTIONS",
    "heldout_sections",
    "merge",
    "metric",
    "owner",
    "read_eval",
    "samples_sections",
]

SECTIONS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
)
HELDOUT, SAMPLES = "flora_heldout", "flora_samples"


def owner(name: str) -> str:
    """The `flora eval` task ("heldout", "mmlu", "samples") that wrote the entry ``name``."""
    if name.startswith(HELDOUT):
        return "heldout"
    if name.startswith(SAMPLES):
        return "samples"
    return "mmlu" if name == "mmlu" or name.startswith("mmlu_") else "?"


def _loss_entry(name: str, alias: str, row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "alias": alias,
        "sample_len": row["examples"],
        "loss,none": row["loss"],
        "perplexity,none": row["perplexity"],
        "tokens": row["tokens"],
    }


def heldout_sections(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The sections of a held-out report (flora.evaluation.heldout.heldout_report)."""
    results = {HELDOUT: _loss_entry(HELDOUT, "heldout", report)}
    for category, row in report["per_category"].items():
        name = f"{HELDOUT}_{category}"
        results[name] = _loss_entry(name, category, row)
    return {
        "results": results,
        "group_subtasks": {HELDOUT: [n for n in results if n != HELDOUT]},
        "n-shot": dict.fromkeys(results, 0),
        "higher_is_better": {n: {"loss": False, "perplexity": False} for n in results},
        "n-samples": {n: _counts(r["sample_len"]) for n, r in results.items()},
    }


def samples_sections(file: str, count: int, base: str | None) -> dict[str, dict[str, Any]]:
    """The sections of the MT-Bench samples task: where the answers are, and beside what."""
    entry = {"name": SAMPLES, "alias": "samples", "sample_len": count, "file": file, "base": base}
    return {"results": {SAMPLES: entry}, "n-samples": {SAMPLES: _counts(count)}}


def _counts(count: int) -> dict[str, int]:
    return {"original": count, "effective": count}  # no limit: all of them


def merge(
    earlier: Mapping[str, Any] | None, fresh: Mapping[str, Any], tasks: Iterable[str]
) -> dict[str, Any]:
    """``fresh`` (an evaluation of ``tasks``) over ``earlier`` (None: none): every entry of the
    other tasks is kept, and so is the earlier config's MMLU ``limit`` when MMLU did not run."""
    ran = set(tasks)
    merged = dict(fresh)
    if earlier is None:
        return _drop_empty(merged)
    for section in SECTIONS:
        kept = {k: v for k, v in earlier.get(section, {}).items() if owner(k) not in ran}
        merged[section] = kept | dict(fresh.get(section, {}))
    timings = {k: v for k, v in earlier.get("timings", {}).items() if k not in ran}
    merged["timings"] = timings | dict(fresh.get("timings", {}))
    if "mmlu" not in ran and "limit" in earlier.get("config", {}):
        merged["config"] = dict(fresh["config"]) | {"limit": earlier["config"]["limit"]}
    return _drop_empty(merged)


def _drop_empty(result: dict[str, Any]) -> dict[str, Any]:
    """Every section present, bar ``groups`` when empty (as the harness leaves it out)."""
    out = {section: dict(result.get(section, {})) for section in SECTIONS}
    if not out["groups"]:
        del out["groups"]
    return out | {k: v for k, v in result.items() if k not in SECTIONS}


def read_eval(path: Path, fix: str) -> dict[str, Any]:
    """An eval.json (``{}`` when there is none); FloraError, ending in ``fix``, for a file that
    is not JSON or not in the harness shape (written by flora before it used that shape)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FloraError(f"{path}: not valid JSON; {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise FloraError(
            f"{path}: not in lm-evaluation-harness's results shape (an older flora wrote it); {fix}"
        )
    return data


def metric(data: Mapping[str, Any], task: str, name: str) -> float | None:
    """``results[task]["<name>,none"]`` as a float; None when absent or "N/A"."""
    value = data.get("results", {}).get(task, {}).get(f"{name},none")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
