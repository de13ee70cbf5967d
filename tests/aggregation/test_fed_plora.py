"""Fed-PLoRA against its paper's claim: a client of any rank starts from the global model exactly
(its drawn components train, the others sit folded in its frozen weights), each component is
averaged over the clients that drew it, and the bytes are r_k (out + in) up, R (out + in) down."""

from __future__ import annotations

import pytest
import torch

from flora.aggregation import aggregate, get_method
from flora.aggregation.fed_plora import drawn
from flora.client import ClientResult
from flora.config import load_config
from flora.factors import LoraFactors
from flora.server import Server
from flora.training import TrainConfig, evaluate_loss, train_client
from flora.weights import applied

from .conftest import TINY_TARGETS

SHAPES = {"m": (12, 10), "n": (6, 10)}
RANKS = [4, 2, 1, 3]
O_I = sum(o + i for o, i in SHAPES.values())


def server(ranks: list[int] = RANKS, fraction: float = 1.0) -> Server:
    overrides = [
        f"lora.ranks={ranks}",
        f"federation.num_clients={len(ranks)}",
        "federation.method='fed-plora'",
        f"federation.fraction={fraction}",
    ]
    return Server(load_config("configs/tiny.toml", overrides), SHAPES)


def trained(task, g: torch.Generator) -> ClientResult:  # type: ignore[no-untyped-def]
    """The client's drawn components moved from their global values, at its own scaling."""
    s = task.alpha / task.rank
    factors = {}
    for m in SHAPES:
        start = task.init[m].with_scaling(s)
        factors[m] = LoraFactors(
            start.A + 0.1 * torch.randn(start.A.shape, generator=g),
            start.B + 0.1 * torch.randn(start.B.shape, generator=g),
            s,
        )
    return ClientResult(task.client, task.round, factors=factors, examples=5 + 3 * task.client)


def play(srv: Server, rounds: int, g: torch.Generator) -> None:
    for t in range(1, rounds + 1):
        tasks = srv.configure(t)
        results = [trained(task, g) for task in tasks]
        srv.complete(tasks, done=[task.client for task in tasks])
        assert srv.aggregate(t, tasks, results) is not None


def test_every_client_starts_from_the_global_model_for_any_rank_mix():
    srv, g = server(), torch.Generator().manual_seed(0)
    play(srv, 2, g)  # a global LoRA with B != 0
    lora = srv.adapter
    for task in srv.configure(3):
        for m, f in lora.items():
            start = task.init[m].delta().double()
            if task.rank < f.rank:
                assert task.folded[m].rank == f.rank - task.rank
                start = start + task.folded[m].delta().double()
            else:
                assert task.folded is None
            # base + folded + the client's LoRA at its start = base + the global LoRA
            torch.testing.assert_close(start, f.delta().double(), rtol=0, atol=1e-6)
        assert task.bytes_down == max(RANKS) * O_I * 4 + sum(u.nbytes() for u in task.catch_up)


def test_each_component_is_averaged_over_the_clients_that_drew_it_and_kept_otherwise():
    srv, g = server([4, 1, 1]), torch.Generator().manual_seed(1)
    play(srv, 1, g)
    before = srv.adapter
    tasks = srv.configure(2)
    results = [trained(task, g) for task in tasks]
    srv.complete(tasks, done=[t.client for t in tasks])
    outcome = srv.aggregate(2, tasks, results)
    assert outcome is not None
    p = torch.tensor([r.examples for r in results], dtype=torch.float64)
    p = p / p.sum()
    seed = srv.config.seed
    chosen = [drawn(seed, 2, t.client, t.rank, 4) for t in tasks]
    assert chosen[0] == [0, 1, 2, 3] and len(chosen[1]) == len(chosen[2]) == 1
    for m in SHAPES:
        for j in range(4):
            who = [k for k, c in enumerate(chosen) if j in c]
            weight = sum(p[k] for k in who)
            a = sum(p[k] / weight * results[k].factors[m].A[chosen[k].index(j)] for k in who)
            torch.testing.assert_close(srv.adapter[m].A[j], a.float(), rtol=0, atol=1e-6)
    assert outcome.report.bytes_up == [r * O_I * 4 for r in (4, 1, 1)]
    assert srv.adapter.keys() == before.keys()


def test_a_component_no_client_drew_keeps_its_value():
    srv, g = server([4, 1]), torch.Generator().manual_seed(2)
    play(srv, 1, g)
    before = srv.adapter
    tasks = [t for t in srv.configure(2) if t.rank == 1]  # only the small client reports
    results = [trained(task, g) for task in tasks]
    srv.complete(tasks, done=[t.client for t in tasks])
    assert srv.aggregate(2, tasks, results) is not None
    picked = drawn(srv.config.seed, 2, tasks[0].client, 1, 4)
    for m in SHAPES:
        for j in set(range(4)) - set(picked):
            assert torch.equal(srv.adapter[m].A[j], before[m].A[j])
            assert torch.equal(srv.adapter[m].B[:, j], before[m].B[:, j])
        assert not torch.equal(srv.adapter[m].A[picked[0]], before[m].A[picked[0]])


def test_draws_are_seeded_per_round_and_client():
    assert drawn(0, 1, 2, 3, 8) == drawn(0, 1, 2, 3, 8)
    draws = {tuple(drawn(0, t, k, 3, 8)) for t in range(1, 6) for k in range(4)}
    assert len(draws) > 5  # afresh per round and client
    assert drawn(0, 1, 2, 8, 8) == list(range(8))


def test_with_equal_ranks_it_is_fedit():
    g = torch.Generator().manual_seed(3)
    clients = [
        {"m": LoraFactors(torch.randn(3, 10, generator=g), torch.randn(12, 3, generator=g), s)}
        for s in (2.0, 2.0, 2.0)
    ]
    ours = aggregate("fed-plora", clients, [1.0, 2.0, 3.0]).global_factors["m"]
    fedit = aggregate("fedit", clients, [1.0, 2.0, 3.0]).global_factors["m"]
    torch.testing.assert_close(ours.A, fedit.A, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.B, fedit.B, rtol=0, atol=1e-6)


def test_the_report_measures_noise_against_the_clients_whole_models():
    srv, g = server([2, 2, 2, 2]), torch.Generator().manual_seed(4)
    tasks = srv.configure(1)
    results = [trained(task, g) for task in tasks]
    srv.complete(tasks, done=[t.client for t in tasks])
    outcome = srv.aggregate(1, tasks, results)
    assert outcome is not None
    # equal ranks: every client trains every component, FedIT's noise (not zero, not huge)
    assert 0 < outcome.report.noise < 1
    assert not get_method("fed-plora").client_dp


@pytest.mark.usefixtures("torch_single_thread")
def test_a_trained_client_starts_at_the_global_models_loss(tiny_model, token_examples, tokenizer):
    # Prepare: a rank-4 global LoRA over the tiny model's targets, B != 0
    g = torch.Generator().manual_seed(5)
    shapes = TINY_TARGETS
    lifecycle = get_method("fed-plora").lifecycle
    state = lifecycle.start(shapes, [4, 2], seed=0)
    for key, value in state["global_lora"].items():
        state["global_lora"][key] = 0.05 * torch.randn(value.shape, generator=g)
    plan = lifecycle.plan(state, client=1, rank=2, round=1)
    pad = tokenizer.pad_token_id
    with applied(tiny_model, lifecycle.adapter(state)):
        expected = evaluate_loss(tiny_model, token_examples, batch_size=4, pad_id=pad)
    # Execute: one step at lr 0 over the whole batch: its loss is the starting model's
    config = TrainConfig(precision="fp32", lr=0.0, batch_size=4, max_steps=1, lora_dropout=0.0)
    common = {"rank": 2, "alpha": 4.0, "config": config, "seed": 0, "pad_id": pad}
    local = train_client(tiny_model, token_examples, init=plan.init, folded=plan.folded, **common)
    fresh = train_client(tiny_model, token_examples, **common)  # FLoRA's fresh LoRA
    # Assert: no initialisation noise, where a fresh LoRA starts from the base
    assert local.loss_curve[0] == pytest.approx(expected, abs=1e-5)
    assert abs(fresh.loss_curve[0] - expected) > 1e-3
