"""Fed-PLoRA: the global LoRA as R parallel rank-1 modules; a client trains r_k of them and
folds the rest into its frozen weights, so it starts from the global model exactly.

Zhang, Hu and Xu, "Heterogeneous Federated Fine-Tuning with Parallel One-Rank Adaptation",
ICLR 2026, arXiv:2602.16936.

Per module, the server keeps R = max_k r_k rank-1 components (a_j, b_j), j < R: the global
update is G = sum_j b_j a_j (scaling 1; PEFT's init before round 1: a_j Kaiming-uniform,
b_j = 0). In round t client k draws r_k of the R components, S_k (Select-N-Fold: uniformly at
random, afresh every round), downloads all R, trains the selected ones starting from their
global values (its own scaling s_k) and holds the others in its frozen weights,
W0 + sum_{j not in S_k} b_j a_j (flora's ``ClientPlan.folded``). Its starting function is
W0 + G, the global model's, for any mix of ranks: no initialisation noise, the paper's claim
(and the test). It uploads its r_k trained components; the server averages each component over
the clients that trained it, a_j = sum_{k: j in S_k} (p_k / P_j) a_kj and
b_j = sum (p_k / P_j) s_k b_kj with P_j = sum_{k: j in S_k} p_k, and keeps a component that no
client drew this round as it was. Not exact: each rank-1 module averages its factors
separately (FedIT's noise, per module, over fewer clients); with equal ranks every client
trains all R and it is FedIT.
Bytes up, client k: r_k (out + in); down: R (out + in) (every component, as the paper sends).

Choices where the paper leaves room (its method section was not reachable here; the selection,
the fold, the per-module average over the clients that trained it and the broadcast of all R
components are from its abstract, reviews and the notes on it): R is the largest rank of all
clients; the draw is seeded by (the run's seed, round, client), so both runtimes and a resumed
run draw the same; p_k are the data-size weights renormalised over a component's trainers (the
authors' earlier code, TNI-playground/Fed_HeLLo, weights the same way); the global LoRA is never
merged into the base (the global model applies it). ``aggregate`` alone (``flora aggregate`` of
plain adapters, which carry no draw) reads client k's components as the first r_k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.lifecycle import BOTH, ClientPlan, GlobalLora, State
from flora.factors import Adapter, LoraFactors

__all__ = ["LIFECYCLE", "Parallel", "aggregate", "average_components", "drawn", "split"]

_DRAW = "draw"  # the state group holding the run's seed of the draws


def drawn(seed: int, round: int, client: int, rank: int, total: int) -> list[int]:
    """The ``rank`` of ``total`` components client ``client`` trains in ``round``, ascending."""
    if rank >= total:
        return list(range(total))
    generator = torch.Generator().manual_seed((seed * 1_000_003 + round * 10_007 + client) % 2**63)
    return sorted(torch.randperm(total, generator=generator)[:rank].tolist())


def split(lora: LoraFactors, chosen: Sequence[int]) -> tuple[LoraFactors, LoraFactors | None]:
    """(the components ``chosen``, the others: None where there are none) of ``lora``."""
    index = torch.tensor(list(chosen), dtype=torch.long)
    drew = set(chosen)
    rest = torch.tensor([j for j in range(lora.rank) if j not in drew], dtype=torch.long)
    picked = LoraFactors(lora.A[index].clone(), lora.B[:, index].clone(), lora.scaling)
    if not rest.numel():
        return picked, None
    return picked, LoraFactors(lora.A[rest].clone(), lora.B[:, rest].clone(), lora.scaling)


def average_components(
    clients: Sequence[Adapter],
    weights: Sequence[float],
    chosen: Sequence[Sequence[int]],
    previous: Adapter,
) -> Adapter:
    """Each of ``previous``' components averaged over the clients whose ``chosen`` list has it
    (client k's i-th factors are component chosen[k][i]); kept where none has it."""
    merged: Adapter = {}
    for module, old in previous.items():
        A, B = old.A.clone().float(), (old.B * old.scaling).float()
        covered = torch.zeros(old.rank, dtype=torch.float64)
        for picks, p in zip(chosen, weights, strict=True):
            covered[list(picks)] += p
        trained = covered > 0
        A[trained], B[:, trained] = 0.0, 0.0
        for client, picks, p in zip(clients, chosen, weights, strict=True):
            f = client[module]
            index = torch.tensor(list(picks), dtype=torch.long)
            c = (p / covered[index]).float()
            A[index] += f.A.float() * c[:, None]
            B[:, index] += f.B.float() * (c * f.scaling)
        merged[module] = LoraFactors(A, B, 1.0)
    return merged


def aggregate(clients: Sequence[Adapter], weights: Sequence[float]) -> AggregationResult:
    """Every component averaged over the clients that have it, client k's being the first r_k
    (a run passes each client's draw instead: :class:`Parallel`)."""
    ranks = [next(iter(c.values())).rank for c in clients]
    chosen = [list(range(r)) for r in ranks]
    widest = clients[ranks.index(max(ranks))]
    previous = {m: LoraFactors(f.A * 0, f.B * 0, 1.0) for m, f in widest.items()}
    merged = average_components(clients, weights, chosen, previous)
    down = adapter_bytes(merged)
    return AggregationResult(
        method="fed-plora",
        global_factors=merged,
        bytes_up=uploads(clients),
        bytes_down=[down] * len(clients),
    )


@dataclass(frozen=True)
class Parallel(GlobalLora):
    """The global LoRA of R rank-1 components; each client trains its draw of r_k of them over
    the others folded into its base (see the module docstring)."""

    def start(self, shapes: Mapping[str, tuple[int, int]], ranks: list[int], seed: int) -> State:
        return {**super().start(shapes, ranks, seed), _DRAW: {"seed": torch.tensor([seed])}}

    def chosen(self, state: State, round: int, client: int, rank: int) -> list[int]:
        lora = self.adapter(state)
        assert lora is not None
        total = next(iter(lora.values())).rank
        return drawn(int(state[_DRAW]["seed"][0]), round, client, rank, total)

    def plan(self, state: State, client: int, rank: int, round: int) -> ClientPlan:
        lora = self.adapter(state)
        assert lora is not None
        picks = self.chosen(state, round, client, rank)
        init: Adapter = {}
        folded: Adapter = {}
        for module, factors in lora.items():
            init[module], rest = split(factors, picks)
            if rest is not None:
                folded[module] = rest
        return ClientPlan(init, BOTH, adapter_bytes(lora), folded=folded or None)

    def combine(
        self,
        state: State,
        round: int,
        clients: Sequence[int],
        factors: Sequence[Adapter],
        weights: Sequence[float],
    ) -> AggregationResult | None:
        lora = self.adapter(state)
        assert lora is not None
        ranks = [next(iter(f.values())).rank for f in factors]
        chosen = [self.chosen(state, round, k, r) for k, r in zip(clients, ranks, strict=True)]
        merged = average_components(factors, weights, chosen, lora)
        down = adapter_bytes(lora)
        whole = [_whole(f, lora, picks) for f, picks in zip(factors, chosen, strict=True)]
        return AggregationResult(
            method="fed-plora",
            global_factors=merged,
            bytes_up=uploads(factors),
            bytes_down=[down] * len(factors),
            weights=list(weights),
            reference=whole,
        )


def _whole(upload: Adapter, lora: Adapter, picks: Sequence[int]) -> Adapter:
    """A client's whole trained update over W0 (scaling 1): its trained components in place of
    the global ones it drew, the global ones it folded."""
    whole: Adapter = {}
    index = torch.tensor(list(picks), dtype=torch.long)
    for module, g in lora.items():
        f = upload[module]
        A, B = g.A.clone().float(), g.B.clone().float()
        A[index], B[:, index] = f.A.float(), f.B.float() * f.scaling
        whole[module] = LoraFactors(A, B, 1.0)
    return whole


LIFECYCLE = Parallel()
