"""What the server accepts: every upload is screened before aggregation.

One client's upload is accepted only if it adapts exactly the target modules, with (r, in) and
(out, r) floating-point factors of the rank it was assigned, finite values and a positive
finite scaling, the frozen A it was sent (methods that freeze A), an example count between 1 and
what the server knows of that client, and an update norm within the rules:

- ``max_update_norm``: an absolute bound on ||s B A||_F per module;
- ``norm_multiple``: a robust relative bound, a multiple of the median of the *other* uploads'
  norms of that module in the round (leave-one-out, so one hostile client cannot move its own
  yardstick, and two clients already suffice). With ``rank_normalized`` each norm is divided by
  the square root of its rank first: honest updates' norms grow as sqrt(rank) (measured within
  7% of it at ranks 4 to 64 on SmolLM2, docs/robustness.md), so a client of a large rank is not
  mistaken for a hostile one, and the bound can be tight.

A norm beyond a bound is rejected, or with ``norm_action = "clip"`` scaled back onto it (B times
bound / norm). ||s B A||_F comes from the factors, sqrt(sum((B^T B) * (A A^T))) in float64,
without forming the out x in matrix. Pure: no I/O, no model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from flora.aggregation.validate import check_module
from flora.errors import FloraError
from flora.factors import Adapter, LoraFactors

__all__ = ["NORM_ACTIONS", "ScreenRules", "Screened", "Upload", "screen", "update_norm"]

NORM_ACTIONS = ("reject", "clip")


@dataclass(frozen=True)
class ScreenRules:
    max_update_norm: float = 0.0  # per module, absolute (0: no absolute bound)
    norm_multiple: float = 0.0  # x the other uploads' median, per module (0: no relative bound)
    norm_action: str = "reject"  # or "clip"
    max_examples: int = 0  # where the server knows no partition size (0: no bound)
    rank_normalized: bool = False  # the relative bound compares norm / sqrt(rank)


@dataclass
class Upload:
    """One client's upload, with what the server expects of it."""

    client: int
    factors: Adapter
    examples: float
    rank: int | None = None  # the rank it was assigned (None: any)
    known_examples: int | None = None  # its partition's size, where the server knows it
    sent: Adapter | None = None  # the factors it started from (scaling 1), where it was sent some
    frozen: frozenset[str] = frozenset()  # the parts of ``sent`` it had to send back unchanged


@dataclass
class Screened:
    accepted: list[Upload]  # in the order given; clipped ones carry their clipped factors
    rejected: dict[int, str] = field(default_factory=dict)  # client -> reason
    clipped: dict[int, float] = field(default_factory=dict)  # client -> smallest factor applied
    # client -> its upload's ||s B A||_F over all modules (root of the sum of squares), as sent
    # (before any clip), for every upload whose structure passed
    norms: dict[int, float] = field(default_factory=dict)
    # client -> the largest over modules of its norm / the median of the others' (leave-one-out):
    # the norm_multiple at which it would be bounded; for uploads that passed the absolute bound
    ratios: dict[int, float] = field(default_factory=dict)


def update_norm(factors: LoraFactors) -> float:
    """||s B A||_F from the factors: sqrt(sum((B^T B) * (A A^T))), float64."""
    a, b = factors.A.double(), factors.B.double()
    square = float(((b.T @ b) * (a @ a.T)).sum())
    return abs(factors.scaling) * math.sqrt(max(square, 0.0))


def _structure(upload: Upload, shapes: Mapping[str, tuple[int, int]]) -> str | None:
    """Why the upload's modules, shapes, dtypes, values, rank or example count are refused."""
    missing = sorted(set(shapes) - set(upload.factors))
    extra = sorted(set(upload.factors) - set(shapes))
    if missing or extra:
        first = f"lacks module '{missing[0]}'" if missing else f"has extra module '{extra[0]}'"
        return f"{first} ({len(missing)} missing, {len(extra)} extra of the target modules)"
    for module, factors in upload.factors.items():
        try:
            check_module(upload.client, module, factors.A, factors.B, factors.scaling)
        except FloraError as error:
            return str(error)
        out, inp = shapes[module]
        if (factors.out_features, factors.in_features) != (out, inp):
            return (
                f"module '{module}' is {factors.out_features}x{factors.in_features}, the "
                f"layer is {out}x{inp}"
            )
        if upload.rank is not None and factors.rank != upload.rank:
            return (
                f"module '{module}' has rank {factors.rank}, the client was assigned {upload.rank}"
            )
        if upload.frozen and upload.sent is not None:
            start = upload.sent[module].with_scaling(factors.scaling)  # as the client loads it
            for part in sorted(upload.frozen):
                if not torch.equal(getattr(factors, part), getattr(start, part)):
                    sent = f"the frozen {part} the client was sent"
                    return f"module '{module}': lora_{part} differs from {sent}"
    examples = upload.examples
    if not (math.isfinite(examples) and examples >= 1 and float(examples).is_integer()):
        return f"example count {examples} is not a whole number >= 1"
    if upload.known_examples is not None and examples > upload.known_examples:
        return f"example count {int(examples)} exceeds its partition's {upload.known_examples}"
    return None


def _bounded(
    upload: Upload, norms: dict[str, float], bounds: dict[str, float], action: str, why: str
) -> tuple[Upload | None, str | None, float]:
    """The upload within ``bounds`` (clipped), or None and the reason (rejected)."""
    over = {m: n for m, n in norms.items() if n > bounds[m]}
    if not over:
        return upload, None, 1.0
    module = max(over, key=lambda m: over[m] / bounds[m])
    if action == "reject":
        reason = f"update norm {over[module]:.3g} of '{module}' exceeds {why} {bounds[module]:.3g}"
        return None, reason, 1.0
    factors = dict(upload.factors)
    scales = {m: bounds[m] / over[m] * (1 - 1e-6) for m in over}  # a hair inside: B's rounding
    for m, scale in scales.items():
        f = factors[m]
        factors[m] = LoraFactors(f.A, f.B * scale, f.scaling)
        norms[m] = bounds[m]
    return replace(upload, factors=factors), None, min(scales.values())


def screen(
    uploads: Sequence[Upload], shapes: Mapping[str, tuple[int, int]], rules: ScreenRules
) -> Screened:
    """Accept, clip or reject each upload (see the module docstring); pure."""
    if rules.norm_action not in NORM_ACTIONS:
        raise FloraError(f"norm_action must be one of {NORM_ACTIONS}, got {rules.norm_action!r}")
    result = Screened([])
    passed: list[tuple[Upload, dict[str, float]]] = []
    for upload in uploads:
        if rules.max_examples and upload.known_examples is None:
            upload = replace(upload, known_examples=rules.max_examples)
        reason = _structure(upload, shapes)
        norms = {} if reason else {m: update_norm(f) for m, f in upload.factors.items()}
        if reason is None and not all(math.isfinite(n) for n in norms.values()):
            reason = "its update norm overflows (factors too large to multiply in float64)"
        if reason is None:
            result.norms[upload.client] = math.sqrt(sum(n * n for n in norms.values()))
        if reason is None and rules.max_update_norm > 0:
            bounds = dict.fromkeys(norms, rules.max_update_norm)
            kept, reason, scale = _bounded(
                upload, norms, bounds, rules.norm_action, "max_update_norm"
            )
            if kept is not None:
                upload = kept
                if scale < 1:
                    result.clipped[upload.client] = scale
        if reason is not None:
            result.rejected[upload.client] = reason
        else:
            passed.append((upload, norms))
    if rules.rank_normalized:  # norm / sqrt(rank), per module (clipping scales both alike)
        passed = [
            (u, {m: n / math.sqrt(max(1, u.factors[m].rank)) for m, n in norms.items()})
            for u, norms in passed
        ]
    reference = [dict(norms) for _, norms in passed]  # the round's norms before any clip
    for index, (upload, norms) in enumerate(passed):
        others = reference[:index] + reference[index + 1 :]
        medians = {m: statistics.median(o[m] for o in others) for m in norms} if others else {}
        ratios = [norms[m] / v for m, v in medians.items() if v > 0]
        if ratios:
            result.ratios[upload.client] = max(ratios)
        if rules.norm_multiple <= 0 or not others:
            result.accepted.append(upload)
            continue
        # a module whose other updates are all zero gives no yardstick: no relative bound
        bounds = {m: rules.norm_multiple * v if v > 0 else math.inf for m, v in medians.items()}
        per = " (per sqrt(rank))" if rules.rank_normalized else ""
        why = f"{rules.norm_multiple:g} x the others' median{per}"
        kept, reason, scale = _bounded(upload, norms, bounds, rules.norm_action, why)
        if kept is None:
            result.rejected[upload.client] = str(reason)
            continue
        if scale < 1:
            result.clipped[upload.client] = min(scale, result.clipped.get(upload.client, 1.0))
        result.accepted.append(kept)
    return result
