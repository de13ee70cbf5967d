"""Random client adapters for the aggregation tests, and the exact reference in float64."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.factors import Adapter, LoraFactors

SHAPES = {"layers.0.q_proj": (24, 16), "layers.0.v_proj": (8, 16), "layers.1.q_proj": (24, 16)}
# the tiny Llama's LoRA targets (tests/conftest.py's tiny_model): module -> (out, in)
TINY_TARGETS = {
    f"model.layers.{i}.self_attn.{p}": (o, 64)
    for i in range(2)
    for p, o in (("q_proj", 64), ("v_proj", 32))
}


def global_model(server) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """A server's global model beyond W0: every merged update and its method's global LoRA
    (float64), per module."""
    lora = server.adapter or {}
    return {
        m: sum((u.factors[m].delta().double() for u in server.history), lora[m].delta().double())
        for m in server.shapes
    }


def make_clients(
    ranks: Sequence[int],
    *,
    seed: int = 0,
    alphas: Sequence[float] | None = None,
    shared_A: bool = False,
    shapes: dict[str, tuple[int, int]] = SHAPES,
) -> list[Adapter]:
    """Clients with random A and B (B non-zero, as after training), ranks and scalings."""
    generator = torch.Generator().manual_seed(seed)
    alphas = alphas or [2.0 * r for r in ranks]
    shared = {m: torch.randn(ranks[0], i, generator=generator) for m, (_, i) in shapes.items()}
    clients = []
    for rank, alpha in zip(ranks, alphas, strict=True):
        client = {}
        for module, (out, inp) in shapes.items():
            A = shared[module].clone() if shared_A else torch.randn(rank, inp, generator=generator)
            B = torch.randn(out, rank, generator=generator)
            client[module] = LoraFactors(A, B, alpha / rank)
        clients.append(client)
    return clients


def exact_delta(clients: Sequence[Adapter], weights: Sequence[float], module: str) -> torch.Tensor:
    """sum_k p_k s_k B_k A_k in float64, formed densely (independent of flora's stacking)."""
    total = sum(weights)
    out = torch.zeros_like(clients[0][module].B.double() @ clients[0][module].A.double())
    for client, weight in zip(clients, weights, strict=True):
        f = client[module]
        out += (weight / total) * f.scaling * (f.B.double() @ f.A.double())
    return out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(
        torch.linalg.matrix_norm(actual.double() - expected) / torch.linalg.matrix_norm(expected)
    )


def exact_round(server, round: int, train):  # type: ignore[no-untyped-def]
    """Play ``round`` on ``server`` with every sampled client trained by ``train(task) ->
    (ClientResult, its model's change per module)``, and assert the claim of an exact method:
    the global model moved by the example-weighted average of the clients' changes. Returns
    (tasks, outcome)."""
    before = global_model(server)
    tasks = server.configure(round)
    done = [train(task) for task in tasks]
    server.complete(tasks, done=[task.client for task in tasks])
    outcome = server.aggregate(round, tasks, [r for r, _ in done])
    assert outcome is not None
    weights = [r.examples for r, _ in done]
    after = global_model(server)
    for m in server.shapes:
        average = sum(w * c[m] for w, (_, c) in zip(weights, done, strict=True)) / sum(weights)
        torch.testing.assert_close(after[m] - before[m], average, rtol=0, atol=1e-5)
    return tasks, outcome
