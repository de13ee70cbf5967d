"""``flora export RUN --out DIR``: a run's adapter, ready for where it will be used.

A run's ``final/adapter`` names its base as the run knew it (a packaged model's hub id, a
checkpoint's absolute path, or ``../base`` for a random tiny model, saved beside it). Exported:

- the adapter (``adapter_model.safetensors``, its model card ``README.md``) with
  ``base_model_name_or_path`` set to ``base`` (a local copy of the base, a model spec or a hub
  id) when given, else to what the run names, a relative name made absolute; so that
  ``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM`` load it from ``DIR`` alone;
- with ``merged``: the base with the adapter merged into it (``merge_and_unload``) and its
  tokenizer, a plain transformers checkpoint, for tools that take no adapter.

``DIR`` is written whole or not at all (a temporary sibling renamed into place) and never
over another export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from flora.errors import FloraError

__all__ = ["base_of", "export_run"]

_FILES = ("adapter_model.safetensors", "README.md")


def base_of(adapter: Path, base: str | None) -> str:
    """The base an exported adapter names: ``base`` (a path made absolute), else the run's."""
    if base is not None:
        given = Path(base).expanduser()
        return str(given.resolve()) if given.exists() else base
    declared = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    name = str(declared.get("base_model_name_or_path") or "")
    if not name:
        raise FloraError(f"{adapter}/adapter_config.json names no base; pass --base PATH")
    if name.startswith("."):  # relative to the adapter: the run's own copy (tiny models)
        return str((adapter / name).resolve())
    return name


def export_run(run_dir: Path, out: Path, *, base: str | None = None, merged: bool = False) -> str:
    """Write ``run_dir``'s final adapter (and with ``merged`` the merged model) to ``out``;
    returns the base the export names."""
    adapter = run_dir / "final" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FloraError(f"{run_dir}: no final/adapter to export; finish the run (flora run)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FloraError(f"{out} exists and is not empty; give another --out")
    reference = base_of(adapter, base)
    work = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        declared = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        declared["base_model_name_or_path"] = reference
        (work / "adapter_config.json").write_text(json.dumps(declared, indent=2) + "\n")
        for name in _FILES:
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, work / name)
        if merged:
            _merge(work, reference)
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return reference


def _merge(work: Path, reference: str) -> None:
    """The base with the adapter in ``work`` merged into it, saved to ``work/merged``."""
    from peft import PeftModel

    from flora.models import load_base

    model, tokenizer = load_base(reference)
    merged = PeftModel.from_pretrained(model, work).merge_and_unload()
    merged.save_pretrained(work / "merged")
    tokenizer.save_pretrained(work / "merged")
