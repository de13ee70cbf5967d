"""A method with its own client side, defined outside flora (the seam's proof, in one file).

Alternating factors (the idea of RoLoRA, Chen et al., NeurIPS 2025, arXiv:2502.01755, in this
order): in odd rounds clients train B over the frozen A of the global LoRA, in even rounds A
over the frozen B. The factor that did not train is the same for every client, so averaging the
trained one is exact: with A shared, sum_k p_k s B_k A = (sum_k p_k s B_k) A; with B shared,
sum_k p_k s B A_k = s B (sum_k p_k A_k). Equal ranks (one scaling s). Bytes: up, the trained
factor; down, the whole global LoRA (both factors change over two rounds).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.aggregation.base import AggregationResult, adapter_bytes, uploads
from flora.aggregation.lifecycle import ClientPlan, GlobalLora, State
from flora.aggregation.lowrank import truncate, weighted_sum
from flora.aggregation.registry import Method
from flora.errors import FloraError
from flora.factors import Adapter, LoraFactors

__all__ = ["LIFECYCLE", "METHOD", "aggregate"]


class Alternate(GlobalLora):
    """The global LoRA as GlobalLora keeps it; B trains in odd rounds, A in even ones."""

    def plan(self, state: State, client: int, rank: int, round: int) -> ClientPlan:
        lora = self.adapter(state)
        assert lora is not None
        init = {m: truncate(f, rank) for m, f in lora.items()}
        trains = frozenset("B") if round % 2 == 1 else frozenset("A")
        return ClientPlan(init, trains, adapter_bytes(init))


LIFECYCLE = Alternate()


def aggregate(clients: Sequence[Adapter], weights: Sequence[float]) -> AggregationResult:
    """Average the factor that trained; keep the shared one (scaling folded into B)."""
    out: Adapter = {}
    trained = "B"
    for module in clients[0]:
        factors = [c[module] for c in clients]
        if len({f.scaling for f in factors}) != 1:
            raise FloraError("alternate: give every client the same rank and alpha (one scaling)")
        s = factors[0].scaling
        if all(torch.equal(f.A, factors[0].A) for f in factors):  # B trained over a shared A
            out[module] = LoraFactors(
                factors[0].A.clone(), s * weighted_sum([f.B for f in factors], weights), 1.0
            )
        else:  # A trained under a shared B
            trained = "A"
            out[module] = LoraFactors(
                weighted_sum([f.A for f in factors], weights), s * factors[0].B, 1.0
            )
    return AggregationResult(
        method="alternate",
        global_factors=out,
        bytes_up=uploads(clients, parts=trained),
        bytes_down=[adapter_bytes(out)] * len(clients),
    )


METHOD = Method(
    name="alternate",
    module=__name__,
    exact=True,
    mixed_ranks=False,
    paper="after Chen et al., NeurIPS 2025 (RoLoRA)",
    summary="B over a frozen A in odd rounds, A under a frozen B in even ones; exact",
)
