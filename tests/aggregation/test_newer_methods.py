"""RoLoRA, FedSVD and FedMomentum against their papers' claims, on tiny tensors through the
server's own round protocol: every round's realised update is the weighted sum of the clients'
updates (RoLoRA: alternately over a shared A and a shared B; FedSVD: over a shared A,
re-factored into an orthonormal A; FedMomentum: the top components kept as the global LoRA, the
residual merged), and the bytes are each formula's."""

from __future__ import annotations

import pytest
import torch

from flora.aggregation import aggregate
from flora.aggregation.fedmomentum import split as fedmomentum_split
from flora.aggregation.fedsvd import orthonormal_refactor
from flora.aggregation.rolora import trained_part
from flora.client import ClientResult
from flora.config import load_config
from flora.errors import FloraError
from flora.factors import LoraFactors
from flora.server import Server

from .conftest import exact_round, global_model

SHAPES = {"m": (12, 10), "n": (6, 10)}
RANK = 3


def server(method: str, fraction: float = 1.0, *options: str) -> Server:
    overrides = [
        *options,
        f"lora.ranks={[RANK] * 4}",
        "federation.num_clients=4",
        f"federation.method='{method}'",
        f"federation.fraction={fraction}",
    ]
    return Server(load_config("configs/tiny.toml", overrides), SHAPES)


def train(task, generator: torch.Generator) -> tuple[ClientResult, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """A client's round: the parts it trains moved from its init, the others sent back as
    received; and its model's change, s B A - B0 A0 (dense, float64)."""
    s = task.alpha / task.rank
    factors, change = {}, {}
    for m in SHAPES:
        start = task.init[m].with_scaling(s)
        A, B = start.A, start.B
        if "A" in task.trains:
            A = A + 0.1 * torch.randn(A.shape, generator=generator)
        if "B" in task.trains:
            B = B + 0.1 * torch.randn(B.shape, generator=generator)
        factors[m] = LoraFactors(A, B, s)
        change[m] = s * B.double() @ A.double() - task.init[m].delta().double()
    return ClientResult(
        task.client, task.round, factors=factors, examples=5 + 3 * task.client
    ), change


@pytest.mark.parametrize("method", ["rolora", "fedsvd", "fedmomentum"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_every_round_realises_the_weighted_sum_of_the_clients_updates(method, fraction):
    srv, g = server(method, fraction), torch.Generator().manual_seed(0)
    for t in (1, 2, 3, 4):
        tasks, outcome = exact_round(srv, t, lambda task: train(task, g))
        part = {"rolora": trained_part(t), "fedsvd": "B"}.get(method, "AB")
        assert all(task.trains == frozenset(part) for task in tasks), t
        # the uplink is the trained factors; the downlink the whole pair (and any catch-up)
        o_i = {"A": sum(i for _, i in SHAPES.values()), "B": sum(o for o, _ in SHAPES.values())}
        assert outcome.report.bytes_up == [RANK * sum(o_i[p] for p in part) * 4] * len(tasks)
        pair = RANK * (o_i["A"] + o_i["B"]) * 4
        for task in tasks:
            assert task.bytes_down == pair + sum(u.nbytes() for u in task.catch_up)


def test_fedsvd_keeps_an_orthonormal_A_after_every_round():
    srv, g = server("fedsvd"), torch.Generator().manual_seed(1)
    for t in (1, 2, 3):
        tasks = srv.configure(t)
        results = [train(task, g)[0] for task in tasks]
        srv.complete(tasks, done=[task.client for task in tasks])
        srv.aggregate(t, tasks, results)
        for f in srv.adapter.values():
            torch.testing.assert_close(f.A @ f.A.T, torch.eye(RANK), rtol=0, atol=1e-5)


def test_the_svd_refactoring_preserves_the_product_even_below_full_rank():
    g = torch.Generator().manual_seed(2)
    B = torch.randn(12, 3, generator=g)
    B[:, 2] = B[:, 0]  # rank 2 of 3
    factors = LoraFactors(torch.randn(3, 10, generator=g), B, 1.0)
    new = orthonormal_refactor(factors)
    assert new.rank == 3
    torch.testing.assert_close(new.delta(), factors.delta(), rtol=0, atol=1e-5)
    torch.testing.assert_close(new.A @ new.A.T, torch.eye(3), rtol=0, atol=1e-5)


def test_rolora_averages_A_under_a_shared_B_and_refuses_uploads_that_share_neither():
    g = torch.Generator().manual_seed(3)
    B = torch.randn(12, 3, generator=g)
    clients = [{"m": LoraFactors(torch.randn(3, 10, generator=g), B, 2.0)} for _ in range(3)]
    result = aggregate("rolora", clients, [1.0, 2.0, 3.0])
    expected = sum(w * 2.0 * B @ c["m"].A for w, c in zip([1, 2, 3], clients, strict=True)) / 6
    torch.testing.assert_close(result.global_factors["m"].delta(), expected, rtol=0, atol=1e-5)
    assert result.bytes_up == [3 * 10 * 4] * 3  # A alone
    clients[1] = {"m": LoraFactors(torch.randn(3, 10, generator=g), B + 1, 2.0)}
    with pytest.raises(FloraError, match="share neither lora_A nor lora_B"):
        aggregate("rolora", clients, [1.0, 2.0, 3.0])


def test_fedmomentum_keeps_a_balanced_rank_r_lora_and_merges_the_rest():
    srv, g = server("fedmomentum"), torch.Generator().manual_seed(4)
    tasks = srv.configure(1)
    results = [train(task, g)[0] for task in tasks]
    srv.complete(tasks, done=[task.client for task in tasks])
    outcome = srv.aggregate(1, tasks, results)
    assert outcome is not None and outcome.fields["dropped_share"] == 0.0
    for m, f in srv.adapter.items():
        assert f.rank == RANK  # the global LoRA keeps the clients' rank
        # each component's singular value split evenly: |B column| = |A row|
        torch.testing.assert_close(f.B.norm(dim=0), f.A.norm(dim=1), rtol=1e-4, atol=0)
        # the residual: four clients' stacked rank (or the layer's) less the kept r
        assert srv.history[-1].factors[m].rank == min(4 * RANK, *SHAPES[m]) - RANK
    assert outcome.fields["residual_rank"] == max(min(4 * RANK, *s) - RANK for s in SHAPES.values())


def test_fedmomentum_below_the_whole_residual_drops_what_it_reports():
    srv, g = (
        server("fedmomentum", 1.0, "federation.options.residual=0.5"),
        torch.Generator().manual_seed(5),
    )
    tasks = srv.configure(1)
    done = [train(task, g) for task in tasks]
    srv.complete(tasks, done=[task.client for task in tasks])
    outcome = srv.aggregate(1, tasks, [r for r, _ in done])
    assert outcome is not None
    weights = [r.examples for r, _ in done]
    after, missing, total = global_model(srv), 0.0, 0.0
    for m in SHAPES:
        average = sum(w * c[m] for w, (_, c) in zip(weights, done, strict=True)) / sum(weights)
        missing += float((average - after[m]).norm() ** 2)
        total += float(average.norm() ** 2)
    assert 0 < outcome.fields["dropped_share"] < 1
    assert outcome.fields["dropped_share"] == pytest.approx((missing / total) ** 0.5, rel=1e-4)


def test_fedmomentum_svd_split_keeps_the_product_with_orthonormal_A():
    g = torch.Generator().manual_seed(5)
    factors = LoraFactors(torch.randn(6, 10, generator=g), torch.randn(12, 6, generator=g), 1.0)
    balanced, rest, _, _ = fedmomentum_split(factors, 3)
    svd, rest_svd, _, _ = fedmomentum_split(factors, 3, balanced=False)
    torch.testing.assert_close(svd.delta(), balanced.delta(), rtol=0, atol=1e-5)
    torch.testing.assert_close(svd.A @ svd.A.T, torch.eye(3), rtol=0, atol=1e-5)
    assert rest is not None and rest_svd is not None
    torch.testing.assert_close(rest_svd.delta(), rest.delta(), rtol=0, atol=1e-6)
    srv = server("fedmomentum", 1.0, "federation.options.split='svd'")
    assert srv.lifecycle.split == "svd"
