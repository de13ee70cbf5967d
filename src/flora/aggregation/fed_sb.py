"""Fed-SB (experimental): frozen A and B from an approximation of the update, only an r x r
core R between them trained and averaged.

Singhal, Ponkshe, Vartak, Varshney and Vepakomma, "Fed-SB: A Silver Bullet for Extreme
Communication Efficiency and Performance in (Private) Federated LoRA Fine-Tuning",
arXiv:2502.15436 (2025), on LoRA-SB (Ponkshe et al., arXiv:2411.19557).

Per module, the update is B R A with B (out, r) and A (r, in) fixed after initialisation and
R (r, r) trained. LoRA-SB initialises from the truncated SVD of an approximate first update
U S V^T: B = U_r, A = V_r^T, R = S_r. With every client on the same A and B, averaging the
cores is exact: sum_k p_k B R_k A = B (sum_k p_k R_k) A, and a round costs r^2 per module each
way, independent of the number of clients and of the layer's size.

How flora runs it (equal ranks). Round 1 is FLoRA's: fresh LoRAs, the exact stacked aggregate
D_1 = sum_k p_k s_k B_k A_k; its thin SVD (from the stacked factors) gives the frame and the
first core, B = U_r, A = V_r^T, R = S_r, and the components beyond r merge into every base, so
the global model after round 1 is the clients' exact average (as FedMomentum's split). From
round 2 every client starts from the global core between the frozen frame (``trains`` = {"R"};
the engine puts an r x r linear after lora_A) and sends back B as received and A = R_k A; the
server averages A under the shared B (exact) and reads the new core off the frame's
orthonormal rows, R = A_avg A^T. Bytes up, client k: r(o + i) in round 1, then r^2 per module;
down: round 1's residual (through catch-up), then r^2 per module, plus the frame, r(o + i),
the first time a client trains R. (What a flora client sends back is the whole LoRA B, R A,
which the byte count reads as the core it is: the server knows A.)

Choices where the paper leaves room, and why it is marked experimental: LoRA-SB's init is one
sign-gradient step of full fine-tuning, which the reference code (CERT-Lab/fed-sb) computes on
the whole pooled training set, not federated; flora takes the approximation from the first
federated round's exact aggregate instead (the clients' own training, no pooled data). The
reference code's experiments run one round (``--rounds 1``; the multi-round script, added
later, re-averages round 1's cores in round 2), its aggregation is a plain mean over equal
shards (flora weights by examples, which is the same there), and a user reports it ineffective
on non-IID data (CERT-Lab/fed-sb issues #1 and #5): its figures in docs/results.md are flora's
own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flora.aggregation import flora as stacking
from flora.aggregation.base import AggregationResult, adapter_bytes
from flora.aggregation.lifecycle import CORE, ClientPlan, GlobalLora, State, Step, initial_lora
from flora.aggregation.lowrank import lowrank_svd, numerical_rank, weighted_sum
from flora.aggregation.validate import check_equal_ranks
from flora.factors import Adapter, LoraFactors, adapter_from_tensors, adapter_to_tensors

__all__ = ["LIFECYCLE", "Silver", "aggregate", "core_bytes", "frame_of"]

_FRAME, _CORE, _HOLDERS = "frame", "core", "holders"


def core_bytes(adapter: Adapter) -> int:
    """Bytes of every module's r x r core, fp32."""
    return sum(4 * f.rank * f.rank for f in adapter.values())


def _shared_B(clients: Sequence[Adapter]) -> bool:
    return all(
        torch.equal(c[m].B, clients[0][m].B) and c[m].scaling == clients[0][m].scaling
        for c in clients[1:]
        for m in clients[0]
    )


def aggregate(clients: Sequence[Adapter], weights: Sequence[float]) -> AggregationResult:
    """Clients that share B (a round that trains cores): A averaged under it, exact, r^2 per
    module each way. Otherwise (round 1's fresh LoRAs): FLoRA's exact stacking."""
    check_equal_ranks(clients, "fed-sb")
    if len(clients) < 2 or not _shared_B(clients):
        return dataclasses.replace(stacking.aggregate(clients, weights), method="fed-sb")
    merged: Adapter = {}
    for module in clients[0]:
        factors = [c[module] for c in clients]
        A = weighted_sum([f.A for f in factors], weights)
        merged[module] = LoraFactors(A, factors[0].B * factors[0].scaling, 1.0)
    cores = [core_bytes(c) for c in clients]
    return AggregationResult(
        method="fed-sb", global_factors=merged, bytes_up=cores, bytes_down=list(cores)
    )


def frame_of(update: LoraFactors, rank: int) -> tuple[LoraFactors, torch.Tensor, LoraFactors]:
    """(the frame A = V_r^T, B = U_r, the core S_r as an r x r matrix, the components beyond r
    at the numerical rank, B = U S, A = Vh: one zero component where there are none) of
    ``update``'s SVD, taken once."""
    U, S, Vh = lowrank_svd(update.B, update.A)
    core = torch.zeros(rank, rank)
    keep = min(rank, S.numel())
    core[:keep, :keep] = torch.diag(S[:keep]).float()
    A = torch.zeros(rank, update.in_features)
    B = torch.zeros(update.out_features, rank)
    A[:keep], B[:, :keep] = Vh[:keep].float(), U[:, :keep].float()
    n = numerical_rank(S)
    if n > rank:
        rest = LoraFactors(
            Vh[rank:n].float().contiguous(), (U[:, rank:n] * S[rank:n]).float().contiguous(), 1.0
        )
    else:
        rest = LoraFactors(
            torch.zeros(1, update.in_features), torch.zeros(update.out_features, 1), 1.0
        )
    return LoraFactors(A.contiguous(), B.contiguous(), 1.0), core, rest


@dataclass(frozen=True)
class Silver(GlobalLora):
    """Round 1 FLoRA's; then a frozen frame and a trained core (see the module docstring)."""

    def start(self, shapes: Mapping[str, tuple[int, int]], ranks: list[int], seed: int) -> State:
        rank = max(ranks)
        frame = initial_lora(shapes, rank, seed)  # a placeholder until round 1 sets it
        return {
            _FRAME: adapter_to_tensors(frame),
            _CORE: {m: torch.zeros(rank, rank) for m in sorted(shapes)},
            # ready: the frame is set; then one flag per client: it has the frame
            _HOLDERS: {"ready": torch.zeros(1), "clients": torch.zeros(len(ranks))},
        }

    def _ready(self, state: State) -> bool:
        return bool(state[_HOLDERS]["ready"][0] > 0)

    def _frame(self, state: State) -> Adapter:
        return adapter_from_tensors(state[_FRAME], source="the method's state")

    def plan(self, state: State, client: int, rank: int, round: int) -> ClientPlan:
        if not self._ready(state):
            return ClientPlan()  # round 1: FLoRA's fresh LoRA
        frame = self._frame(state)
        core = {m: state[_CORE][m].clone() for m in frame}
        sent = core_bytes(frame)
        if not state[_HOLDERS]["clients"][client] > 0:
            sent += adapter_bytes(frame)
        return ClientPlan(frame, frozenset(CORE), sent, core=core)

    def advance(
        self,
        state: State,
        result: AggregationResult,
        round: int,
        ranks: list[int],
        starts: Sequence[Adapter | None] = (),
    ) -> Step:
        rank = max(ranks)
        holders = {k: v.clone() for k, v in state[_HOLDERS].items()}
        if self._ready(state):  # the averaged A under the frame's B: R = A_avg A_frame^T
            frame = self._frame(state)
            core = {
                m: (f.A.double() @ frame[m].A.double().T).float()
                for m, f in result.global_factors.items()
            }
            for k in result.clients:
                holders["clients"][k] = 1.0
            return Step({**state, _CORE: core, _HOLDERS: holders})
        frames: Adapter = {}
        core = {}
        merged: Adapter = {}
        for module, update in sorted(result.global_factors.items()):
            frames[module], core[module], merged[module] = frame_of(update, rank)
        holders["ready"][0] = 1.0
        state = {**state, _FRAME: adapter_to_tensors(frames), _CORE: core, _HOLDERS: holders}
        return Step(state, merged)

    def adapter(self, state: State) -> Adapter | None:
        frame = self._frame(state)
        if not self._ready(state):
            return {m: LoraFactors(f.A, f.B * 0, 1.0) for m, f in frame.items()}
        return {m: LoraFactors(state[_CORE][m] @ f.A, f.B.clone(), 1.0) for m, f in frame.items()}


LIFECYCLE = Silver()
