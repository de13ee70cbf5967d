"""A method's life across rounds: what its clients train, what the server keeps, what each
client downloads.

peft's ``LoraVariant`` owns how a layer inits, trains and merges; Flower's strategies own their
payload (``configure_train``) and their state (``aggregate_train``). A flora method does both
through one :class:`Lifecycle` object, defined in the method's own module as ``LIFECYCLE``
beside its ``aggregate`` (flora.aggregation.registry finds it there; a module without one gets
:class:`MergeEachRound`, FLoRA's own life):

- the server's state is the method's: an opaque dict of named tensor groups
  (``{"global_lora": {...}}``), which the server checkpoints group by group and gives back to
  the method every round; the server itself keeps only the history of merged updates;
- :meth:`Lifecycle.plan` says, as data, what client k does in round t: the LoRA it starts from
  (factors of scaling 1, or None for PEFT's fresh init), which parts it trains (``trains``: the
  others must come back unchanged, and the screen checks it), and the bytes of that download;
- :meth:`Lifecycle.combine` aggregates a round where the uploads alone do not say how (the
  method's state, or which client sent what); by default the method's pure ``aggregate`` does;
- :meth:`Lifecycle.advance` takes one aggregation into the next state and says what, if
  anything, merges into every base this round (low-rank factors and an optional dense
  residual), which the server appends to the history that clients catch up on;
- :meth:`Lifecycle.adapter` is the LoRA to apply over the merged base: the global model is the
  base plus every merged update plus this adapter, for evaluation, ``final/`` and export;
- on the client, :meth:`Lifecycle.start` turns what the client received into its starting
  factors and :meth:`Lifecycle.upload` turns its trained factors into what it sends.

Pure tensors: no models, files or networks. The two stock lives: :class:`MergeEachRound` (flora,
florist, fedex-lora) and :class:`GlobalLora` (fedit, zero-padding, flexlora; ffa-lora with B
alone trained).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from flora.aggregation.base import AggregationResult, adapter_bytes
from flora.aggregation.lowrank import truncate
from flora.errors import FloraError
from flora.factors import Adapter, LoraFactors, adapter_from_tensors, adapter_to_tensors

__all__ = [
    "BOTH",
    "CORE",
    "PARTS",
    "ClientPlan",
    "GlobalLora",
    "Lifecycle",
    "MergeEachRound",
    "State",
    "Step",
    "check_parts",
    "initial_lora",
    "kaiming_rows",
    "moving",
    "parts_bytes",
]

PARTS = ("A", "B")  # what the engine can train: lora_A (r, in) and lora_B (out, r) ...
BOTH = frozenset(PARTS)
# ... or, alone, an r x r core R between a frozen A and B (LoRA-SB): the LoRA is then B (R A),
# so of the factors a client sends back only A moves (within the row space of the init's A)
CORE = "R"

# The method's server state: named groups of named tensors (each group one checkpoint file).
State = dict[str, dict[str, torch.Tensor]]


def check_parts(trains: Collection[str], where: str = "trains") -> frozenset[str]:
    """``trains`` as a frozenset of known part names, or FloraError naming the fix."""
    parts = frozenset(trains)
    if parts == {CORE}:
        return parts
    unknown = sorted(parts - BOTH)
    if unknown or not parts:
        raise FloraError(
            f"{where} = {sorted(parts)}: a client trains a non-empty subset of {list(PARTS)}, or "
            f"['{CORE}'] alone; {unknown or 'nothing'} is not one the engine trains"
        )
    return parts


def moving(trains: Collection[str]) -> frozenset[str]:
    """The factors (of "A", "B") that training ``trains`` may change: a core R moves A."""
    parts = frozenset(trains)
    return frozenset("A") if CORE in parts else parts


def parts_bytes(adapter: Adapter, parts: Collection[str]) -> int:
    """Bytes of ``adapter``'s factors in ``parts`` ("A", "B")."""
    return adapter_bytes(adapter, parts="".join(sorted(parts)))


def initial_lora(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int) -> Adapter:
    """A starting global LoRA: A Kaiming-uniform as PEFT inits it, B zero, scaling 1."""
    generator = torch.Generator().manual_seed(seed)
    adapter: Adapter = {}
    for module in sorted(shapes):
        out_features, in_features = shapes[module]
        A = kaiming_rows(rank, in_features, generator)
        adapter[module] = LoraFactors(A, torch.zeros(out_features, rank), 1.0)
    return adapter


def kaiming_rows(rows: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """``rows`` fresh rows of lora_A (rows, in), Kaiming-uniform as PEFT inits them."""
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on (rows, in)
    return (torch.rand(rows, in_features, generator=generator) * 2 - 1) * bound


@dataclass(frozen=True)
class ClientPlan:
    """What one client does in one round besides catching up, as data (on its ClientTask)."""

    init: Adapter | None = None  # its starting factors at scaling 1 (None: PEFT's fresh init)
    trains: frozenset[str] = BOTH  # the parts it trains; the others come back as sent
    bytes_down: int = 0  # what this download costs (catch-up is counted apart)
    # the init is part of the global model already: the client trains over its base minus
    # B0 @ A0, so that its starting function is the global model's (a warm start)
    fold: bool = False
    # a LoRA (scaling 1) added to the client's frozen weights while it trains: global parts it
    # does not train but starts from (Fed-PLoRA's folded components)
    folded: Adapter | None = None
    # with trains = {"R"}: each module's r x r core to start from, between the init's A and B
    core: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Step:
    """One aggregation applied: the method's next state and what merges into every base."""

    state: State
    merged: Adapter | None = None  # low-rank factors (scaling 1) merged into the base ...
    residual: dict[str, torch.Tensor] | None = None  # ... and a dense (out, in) part of it
    fields: dict[str, float] = field(default_factory=dict)  # the method's server-row fields
    wire: str = "fp32"  # the number format ``merged`` travels in (flora.wire; on its grid)


@dataclass(frozen=True)
class Lifecycle:
    """A method's server state and client side; the defaults are FLoRA's (merge each round,
    clients start fresh LoRAs that train A and B). Subclass and override what differs."""

    trains: frozenset[str] = field(default=BOTH)  # what a client trains, every round

    def start(self, shapes: Mapping[str, tuple[int, int]], ranks: list[int], seed: int) -> State:
        """The state before round 1 (``shapes``: module -> (out, in); ``ranks``: every
        client's)."""
        return {}

    def plan(self, state: State, client: int, rank: int, round: int) -> ClientPlan:
        """What ``client`` (of rank ``rank``) starts from and trains in ``round``."""
        return ClientPlan(trains=self.trains)

    def combine(
        self,
        state: State,
        round: int,
        clients: Sequence[int],
        factors: Sequence[Adapter],
        weights: Sequence[float],
    ) -> AggregationResult | None:
        """The round's aggregation where it needs more than the uploads (the method's state,
        who sent what: ``clients`` are their ids, ``weights`` normalised); None: the method's
        pure ``aggregate`` of the uploads, as every stock method."""
        return None

    def advance(
        self,
        state: State,
        result: AggregationResult,
        round: int,
        ranks: list[int],
        starts: Sequence[Adapter | None] = (),
    ) -> Step:
        """The state after ``result``, and what merges into every base. ``starts``: the
        aggregated clients' starting factors (their plans' ``init``), in ``result.weights``'
        order."""
        return Step(state, result.global_factors, result.residual)

    def adapter(self, state: State) -> Adapter | None:
        """The LoRA the global model applies over its merged base (None: none)."""
        return None

    # --- on the client --------------------------------------------------------------------
    def start_factors(self, init: Adapter | None, rank: int) -> Adapter | None:
        """The client's starting factors from what it received (``init``: scaling 1)."""
        return init

    def upload(self, trained: Adapter, init: Adapter | None) -> Adapter:
        """What the client sends up from its trained factors (at its own scaling)."""
        return trained


@dataclass(frozen=True)
class MergeEachRound(Lifecycle):
    """Each round's update merges into the base weights and clients start fresh LoRAs: FLoRA,
    FLoRIST, FedEx-LoRA. Clients that missed rounds catch up on the history first."""


@dataclass(frozen=True)
class GlobalLora(Lifecycle):
    """The server keeps one global LoRA at the largest rank of all clients; each client starts
    from its truncation to its own rank (Kaiming-uniform A, zero B before round 1, as PEFT
    inits). With ``trains`` = {"B"} (FFA-LoRA) A stays as initialised and only B travels;
    ``sends`` names the parts a client downloads where they differ from those it trains."""

    sends: frozenset[str] | None = None  # the parts downloaded (None: the parts trained)

    def start(self, shapes: Mapping[str, tuple[int, int]], ranks: list[int], seed: int) -> State:
        return {"global_lora": adapter_to_tensors(initial_lora(shapes, max(ranks), seed))}

    def trains_in(self, round: int) -> frozenset[str]:
        """The parts a client trains in ``round`` (the same every round unless overridden)."""
        return self.trains

    def plan(self, state: State, client: int, rank: int, round: int) -> ClientPlan:
        lora = self.adapter(state)
        assert lora is not None
        init = {m: truncate(f, rank) for m, f in lora.items()}
        trains = self.trains_in(round)
        return ClientPlan(init, trains, parts_bytes(init, self.sends or trains))

    def advance(
        self,
        state: State,
        result: AggregationResult,
        round: int,
        ranks: list[int],
        starts: Sequence[Adapter | None] = (),
    ) -> Step:
        # Keep the global LoRA at the largest rank of ALL clients: a round's participants may
        # all be small, and a larger client joining later must get its full rank (zero-padded).
        width = max(ranks)
        lora = {m: truncate(f, width) for m, f in result.global_factors.items()}
        return Step({**state, "global_lora": adapter_to_tensors(lora)})

    def adapter(self, state: State) -> Adapter | None:
        return adapter_from_tensors(state["global_lora"], source="the method's state")
