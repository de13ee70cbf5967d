"""RoLoRA: clients alternate between training B over a frozen A and A over a frozen B.

Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA",
NeurIPS 2025, arXiv:2502.01755.

Per module, one global LoRA (A, B), equal ranks. In an odd round every client trains B over the
global A and the server averages B = sum_k p_k s_k B_k; in an even round every client trains A
under the global B and the server averages A = sum_k p_k A_k (B kept; the clients share one
scaling s, equal ranks and alphas, so s B is the global B). Exact: with the other factor
shared, the averaged pair's product is sum_k p_k s_k B_k A_k, every round. Bytes up, client
k: the trained factor only, r out (B) or r in (A), half a FedIT upload at square layers.

Choices where the paper leaves room: the paper's algorithm updates B then A inside one
iteration (two exchanges); flora makes each exchange a round, B first (odd rounds), as the
FedLLM-Factory re-implementation (boyi-liu/FedLLM-Factory, alg/rolora.py) does, so a round costs
one local training like every other method's. Bytes down: the whole global pair, r (out + in),
every round: a client sampled this round may have missed the last round's update of either
factor, and flora counts what such a client needs (with every client in every round, only the
factor updated last round would need to travel). Round 1 starts from PEFT's init (A
Kaiming-uniform, B zero), so B trains first, as A's gradient is zero under B = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.lifecycle import BOTH, GlobalLora
from flora.aggregation.lowrank import fold, weighted_sum
from flora.aggregation.validate import check_equal_ranks
from flora.errors import FloraError
from flora.factors import Adapter, LoraFactors

__all__ = ["LIFECYCLE", "Alternating", "aggregate", "trained_part"]


def trained_part(round: int) -> str:
    """The factor clients train in ``round`` (1-based): B in odd rounds, A in even ones."""
    return "B" if round % 2 == 1 else "A"


@dataclass(frozen=True)
class Alternating(GlobalLora):
    """A global LoRA at the clients' rank; each round's clients train one factor of it and
    download both."""

    sends: frozenset[str] | None = BOTH

    def trains_in(self, round: int) -> frozenset[str]:
        return frozenset(trained_part(round))


LIFECYCLE = Alternating()


def _shared(clients: Sequence[Adapter], part: str) -> bool:
    return all(
        torch.equal(getattr(c[m], part), getattr(clients[0][m], part))
        for c in clients[1:]
        for m in clients[0]
    )


def aggregate(clients: Sequence[Adapter], weights: Sequence[float]) -> AggregationResult:
    """Average the factor the clients trained over the one they share (which one is read from
    the uploads: the factor identical on every client is the frozen one; with one client, B)."""
    check_equal_ranks(clients, "rolora")
    if _shared(clients, "A"):
        part = "B"
    elif _shared(clients, "B") and len({c[m].scaling for c in clients for m in c}) == 1:
        part = "A"
    else:
        raise FloraError(
            "rolora: the clients' uploads share neither lora_A nor lora_B (at one scaling); "
            "every client of a round trains one factor and sends the other back as received"
        )
    global_factors: Adapter = {}
    for module in clients[0]:
        factors = [c[module] for c in clients]
        if part == "B":  # B = sum_k p_k s_k B_k over the shared A
            B = weighted_sum([f.B for f in factors], fold(factors, weights))
            global_factors[module] = LoraFactors(factors[0].A.clone(), B, 1.0)
        else:  # A = sum_k p_k A_k under the shared B, at the clients' one scaling s
            A = weighted_sum([f.A for f in factors], weights)
            global_factors[module] = LoraFactors(A, factors[0].B * factors[0].scaling, 1.0)
    down = adapter_bytes(global_factors)
    return AggregationResult(
        method="rolora",
        global_factors=global_factors,
        bytes_up=uploads(clients, parts=part),
        bytes_down=[down] * len(clients),
    )
