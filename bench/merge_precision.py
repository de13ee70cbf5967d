"""How exactly a low-precision base holds the merged updates (issue 10, point 3).

FLoRA merges every round's update B @ A into the base. Added into bf16 weights (8 significant
bits), an update ~1000x smaller than the weight is mostly rounded away. flora's answer
(model.exact_merge = true): a base held in bf16 keeps its target modules in fp32, so the merged
cumulative update stays exact to fp32.

Two measurements, both against a finished fp32-base run of the demo settings (10 rounds):

- replay: the fp32 run's own 10 merged updates (its checkpoints) are added, round by round and
  through flora's merge (flora.weights.merge_update), into SmolLM2's base held (a) in fp32, the
  reference, (b) in bf16 with fp32 target modules (the design), (c) all in bf16 (no design). The
  figure is the relative error ||U - U_ref||_F / ||U_ref||_F of the cumulative update
  U = W_10 - W_0 over all target modules; this isolates the merge from training noise.
- end to end (--runs): finished runs trained on a bf16 base (with and without the design): the
  same error of their final/model's cumulative update against the fp32 run's; training in a
  different precision changes the updates too, so this bounds what a user sees.

    .venv/bin/flora run configs/default.toml --set federation.rounds=10 --set eval.samples=0 \
        --out runs/mp-fp32                                        # ~35 min on 2 cores
    .venv/bin/python bench/merge_precision.py runs/mp-fp32        # the replay, ~20 s
    .venv/bin/python bench/merge_precision.py runs/mp-fp32 --runs runs/mp-bf16 runs/mp-bf16-naive
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from flora.checkpoint import load_checkpoint
from flora.config import load_run_config
from flora.models import load_model
from flora.weights import merge_update, module_weight, target_shapes


def _targets(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    modules = sorted(target_shapes(model, names))
    return {m: module_weight(model, m).double().clone() for m in modules}


def relative_error(u: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float((u[m] - ref[m]).pow(2).sum()) for m in ref)
    den = sum(float(ref[m].pow(2).sum()) for m in ref)
    return (num / den) ** 0.5


def replay(run_dir: Path) -> dict[str, object]:
    config = load_run_config(run_dir)
    names = config.model.target_modules
    history = load_checkpoint(run_dir).history
    cumulative: dict[str, dict[str, torch.Tensor]] = {}
    for label, dtype, keep in (
        ("fp32", "fp32", []),
        ("bf16+fp32 targets", "bf16", names),
        ("bf16", "bf16", []),
    ):
        model, _ = load_model(config.model.name, dtype=dtype, keep_fp32=keep, precision="bf16")
        w0 = _targets(model, names)
        for update in history:
            merge_update(model, update)
        cumulative[label] = {m: w - w0[m] for m, w in _targets(model, names).items()}
        del model
    ref = cumulative["fp32"]
    w0 = _targets(load_model(config.model.name)[0], names)
    w0_norm = sum(float(w.pow(2).sum()) for w in w0.values()) ** 0.5
    ref_norm = sum(float(u.pow(2).sum()) for u in ref.values()) ** 0.5
    return {
        "rounds": len(history),
        "update_to_weight": ref_norm / w0_norm,
        "errors": {label: relative_error(u, ref) for label, u in cumulative.items()},
    }


def _final_targets(run_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run_dir / "final" / "model" / "model.safetensors"))
    return {k: v.double() for k, v in tensors.items() if k.rsplit(".", 2)[-2] in names}


def end_to_end(reference: Path, runs: list[Path]) -> dict[str, float]:
    config = load_run_config(reference)
    names = config.model.target_modules
    base, _ = load_model(config.model.name)
    w0 = {f"{m}.weight": w for m, w in _targets(base, names).items()}
    ref = {k: v - w0[k] for k, v in _final_targets(reference, names).items()}
    out = {}
    for run in runs:
        model = load_run_config(run).model
        label = f"{run.name} (dtype {model.dtype}, exact_merge {model.exact_merge})"
        u = {k: v - w0[k] for k, v in _final_targets(run, names).items()}
        out[label] = relative_error(u, ref)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="a finished run on an fp32 base")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="runs on a bf16 base")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    result: dict[str, object] = {"replay": replay(args.reference)}
    if args.runs:
        result["end_to_end"] = end_to_end(args.reference, args.runs)
    replayed = result["replay"]
    assert isinstance(replayed, dict)
    print(
        f"replay of {replayed['rounds']} merged updates of {args.reference} "
        f"(||U|| / ||W0|| = {replayed['update_to_weight']:.2e}):"
    )
    for label, error in replayed["errors"].items():
        print(f"  base {label:<20} relative error of the cumulative update {error:.3e}")
    for label, error in result.get("end_to_end", {}).items():  # type: ignore[attr-defined]
        print(f"  end to end {label}: {error:.3e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
