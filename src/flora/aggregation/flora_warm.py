"""flora-warm: FLoRA's exact stacking, clients warm-started from the global update, and a
downlink bounded whatever the number of clients (the rest carried, error feedback).

flora's own method (issue 23). FLoRA (Wang et al., NeurIPS 2024, arXiv:2409.05976) is exact,
but every round starts fresh LoRAs (B = 0: A's gradient is zero at first, "initialisation lag",
LoRA-FAIR / FedMomentum) and every client downloads every client's factors ((sum_k r_k)(o + i)).
Here, per module and round t, with p_k the normalised weights and s_k the clients' scalings:

- client k starts from the global model M_t with a warm LoRA: the top-r_k singular components
  (B0_k A0_k, scaling 1) of the last merged update U_{t-1}, padded with fresh components
  (Kaiming-uniform A, zero B) where U_{t-1} has fewer; it trains over M_t - B0_k A0_k (its
  frozen weights hold what its rank cannot), so it starts from M_t exactly (the PiSSA / FRLoRA
  idea of subtracting the init from the base);
- the round's exact update is D_t = sum_k p_k (s_k B_k A_k - B0_k A0_k): the average of the
  clients' trained models minus M_t. The server stacks it with the carried remainder C_t,
  takes the thin SVD of the stack without forming out x in matrices (``lowrank_svd``), merges
  the top ``budget - max_k r_k`` components into everyone's base (U_t) and carries the rest:
  C_{t+1} = C_t + D_t - U_t. Nothing is lost, only delayed: base + C equals W0 + sum_t D_t to
  the fp32 floor (singular values under 1e-7 of the largest are dropped), and the global
  model that the server evaluates and exports applies C (``Lifecycle.adapter``).

Exact: the realised update of the clients' uploads is FLoRA's stacking (``aggregate`` below),
and with ``budget = 0`` (unbounded) nothing is carried: base + U_t = the average of the
clients' trained models, FLoRA's guarantee, for any mix of ranks and any sampled subset.
Bytes up, client k: r_k (o + i). Bytes down, client k and round: the merged update at rank
<= budget - max_k r_k, plus its warm init, r_k (o + i): at most budget (o + i), independent of
the number of clients (catch-up of rounds a client missed comes on top, as ``federation.catch_up``
sends it). Options: ``budget`` (0: unbounded), ``warm`` (false: FLoRA's fresh LoRAs; with
``budget`` > 0 the bounded downlink alone; ``warm`` with ``budget`` = 0 the warm start alone),
``downlink`` (the merged update's number format on the wire, :mod:`flora.wire`: "fp32", "fp16"
or "bf16" (half the bytes) or "int8" with a power-of-two scale per component (a quarter); the
server merges and keeps the rounded values, every client decodes the same, and the rounding
joins the carried remainder, so the sum stays exact and only its delivery is delayed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flora.aggregation import flora as stacking
from flora.aggregation.base import AggregationResult, adapter_bytes
from flora.aggregation.lifecycle import BOTH, ClientPlan, Lifecycle, State, Step, kaiming_rows
from flora.aggregation.lowrank import frobenius, lowrank_svd, numerical_rank, stack
from flora.errors import FloraError
from flora.factors import Adapter, LoraFactors, adapter_from_tensors, adapter_to_tensors
from flora.wire import FORMATS, on_grid

__all__ = ["LIFECYCLE", "WarmStack", "aggregate", "warm_init"]


def aggregate(
    clients: Sequence[Adapter],
    weights: Sequence[float],
    *,
    budget: int = 0,
    warm: bool = True,
    downlink: str = "fp32",
) -> AggregationResult:
    """FLoRA's stacking of the uploads, sum_k p_k s_k B_k A_k (the options are the rounds',
    :class:`WarmStack`'s: they shape what is merged and sent, not this sum)."""
    return dataclasses.replace(stacking.aggregate(clients, weights), method="flora-warm")


def warm_init(update: LoraFactors, rank: int, generator: torch.Generator) -> LoraFactors:
    """The first ``rank`` components of ``update`` (SVD-ordered, scaling 1: the top ones), and
    fresh ones (A Kaiming-uniform as PEFT inits it, B zero) where it has fewer."""
    have = min(rank, update.rank)
    A, B = update.A[:have], update.B[:, :have]  # (have, in), (out, have)
    if have < rank:
        fresh = kaiming_rows(rank - have, update.in_features, generator)
        A = torch.cat([A, fresh.to(A.dtype)])
        B = torch.cat([B, torch.zeros(update.out_features, rank - have, dtype=B.dtype)], dim=1)
    return LoraFactors(A.contiguous(), B.contiguous(), 1.0)


@dataclass(frozen=True)
class WarmStack(Lifecycle):
    """The server keeps the carried remainder and the last merged update (SVD-ordered); see
    the module docstring."""

    budget: int = 0  # ranks of (o + i) a client downloads a round (0: unbounded)
    warm: bool = True  # start from the top components of the last update (else fresh)
    downlink: str = "fp32"  # the merged update's factors on the wire: a format of flora.wire

    def start(self, shapes: Mapping[str, tuple[int, int]], ranks: list[int], seed: int) -> State:
        if self.downlink not in FORMATS:
            raise FloraError(
                f"federation.options.downlink = {self.downlink!r}: the merged update's number "
                f"format on the wire; use one of {', '.join(FORMATS)}"
            )
        if self.budget and self.budget <= max(ranks):
            raise FloraError(
                f"federation.options.budget = {self.budget}: a client downloads its warm init "
                f"(up to rank {max(ranks)}) and the merged update within the budget; give more "
                f"than the largest rank, at least {max(ranks) + 1} (0: unbounded)"
            )
        return {"carry": {}, "last": {}, "seed": {"seed": torch.tensor([seed])}}

    def plan(self, state: State, client: int, rank: int, round: int) -> ClientPlan:
        if not self.warm or not state["last"]:
            return ClientPlan(trains=BOTH)  # FLoRA's fresh LoRA
        last = {  # what every client holds of the last update, in fp32
            m: LoraFactors(f.A.float(), f.B.float(), 1.0)
            for m, f in adapter_from_tensors(state["last"], source="the last update").items()
        }
        seed = int(state["seed"]["seed"][0])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + round * 10_007 + client)
        init = {m: warm_init(last[m], rank, generator) for m in sorted(last)}
        return ClientPlan(init, BOTH, adapter_bytes(init), fold=True)

    def advance(
        self,
        state: State,
        result: AggregationResult,
        round: int,
        ranks: list[int],
        starts: Sequence[Adapter | None] = (),
    ) -> Step:
        carry = adapter_from_tensors(state["carry"], source="carry") if state["carry"] else {}
        width = self.budget - max(ranks) if self.budget else None
        merged: Adapter = {}
        kept: Adapter = {}
        update_norm = carried_norm = rounding = 0.0
        for module, average in sorted(result.global_factors.items()):
            # D = sum_k p_k s_k B_k A_k - sum_k p_k B0_k A0_k; stacked with the carry C
            As, Bs, coeffs = [average.A], [average.B], [1.0]
            for p, start in zip(result.weights, starts, strict=False):
                if start is not None:
                    A0, B0 = start[module].A.float(), start[module].B.float()
                    As, Bs, coeffs = [*As, A0], [*Bs, B0], [*coeffs, -p]
            A, B = stack(As, Bs, coeffs)  # (R, in), (out, R): B @ A = D
            update_norm += frobenius(B, A) ** 2
            if module in carry:
                A = torch.cat([A, carry[module].A])
                B = torch.cat([B, carry[module].B], dim=1)
            U, S, Vh = lowrank_svd(B, A)  # C + D = U diag(S) Vh
            n = numerical_rank(S)
            sent = n if width is None else min(n, width)
            merged[module] = LoraFactors(  # A (sent, in), B (out, sent): the top components
                Vh[:sent].float().contiguous(), (U[:, :sent] * S[:sent]).float().contiguous(), 1.0
            )
            if n > sent:
                kept[module] = LoraFactors(
                    Vh[sent:n].float().contiguous(), (U[:, sent:n] * S[sent:n]).float(), 1.0
                )
                carried_norm += float(S[sent:n].double().square().sum())
            if self.downlink != "fp32":  # what the clients get; the rounding joins the carry
                top = merged[module]
                sent_values = on_grid(top, self.downlink)
                A_err = torch.cat([top.A, sent_values.A])  # B A - B_w A_w, exactly
                B_err = torch.cat([top.B, -sent_values.B], dim=1)
                rounding += frobenius(B_err, A_err) ** 2
                if module in kept:
                    A_err = torch.cat([kept[module].A, A_err])
                    B_err = torch.cat([kept[module].B, B_err], dim=1)
                kept[module] = LoraFactors(A_err.contiguous(), B_err.contiguous(), 1.0)
                merged[module] = sent_values
        fields = {
            "downlink_rank": max(f.rank for f in merged.values()),
            "carried_rank": max((f.rank for f in kept.values()), default=0),
            # the remainder the clients do not have yet, against this round's exact update
            "carried_share": math.sqrt(carried_norm) / max(math.sqrt(update_norm), 1e-30),
        }
        if self.downlink != "fp32":  # the wire's rounding, carried too
            fields["rounding_share"] = math.sqrt(rounding) / max(math.sqrt(update_norm), 1e-30)
        new: State = {
            "carry": adapter_to_tensors(kept),
            "last": adapter_to_tensors(merged),
            "seed": state["seed"],
        }
        return Step(new, merged, None, fields, self.downlink)

    def adapter(self, state: State) -> Adapter | None:
        """The carried remainder: base + history + it = every round's exact update."""
        if not state["carry"]:
            return None
        return adapter_from_tensors(state["carry"], source="the carried remainder")


def LIFECYCLE(budget: int = 0, warm: bool = True, downlink: str = "fp32") -> WarmStack:
    """The method's life at its options (flora.aggregation.registry calls it)."""
    return WarmStack(budget=budget, warm=warm, downlink=downlink)
