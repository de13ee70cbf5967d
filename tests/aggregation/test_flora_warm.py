"""flora-warm's four claims on tiny tensors, through the server's own round protocol:
noise-free (base + carried remainder = every round's exact average), warm (each client starts
from the top components of the last update, its starting function the global model's),
bounded (no client downloads more than the budget a round), and exact FLoRA at budget 0."""

from __future__ import annotations

import pytest
import torch

from flora.aggregation.flora_warm import warm_init
from flora.client import ClientResult
from flora.config import load_config
from flora.errors import FloraError
from flora.factors import LoraFactors
from flora.server import Server
from flora.wire import on_grid

SHAPES = {"m": (12, 10), "n": (6, 10)}
RANKS = [4, 2, 2, 1]


def server(budget: int, fraction: float = 1.0, warm: bool = True, downlink: str = "fp32") -> Server:
    config = load_config(
        "configs/tiny.toml",
        [
            f"lora.ranks={RANKS}",
            "federation.num_clients=4",
            "federation.method='flora-warm'",
            f"federation.options.budget={budget}",
            f"federation.options.warm={str(warm).lower()}",
            f"federation.fraction={fraction}",
            f"federation.options.downlink='{downlink}'",
        ],
    )
    return Server(config, SHAPES)


def train(task, generator: torch.Generator) -> tuple[ClientResult, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """A client's round: trained factors at its scaling (moved from its warm init, or random),
    and its trained model's change from the global model it started from (dense, float64)."""
    s = task.alpha / task.rank
    factors, change = {}, {}
    for m, (o, i) in SHAPES.items():
        A = torch.randn(task.rank, i, generator=generator)
        B = torch.randn(o, task.rank, generator=generator)
        if task.init is not None:  # it trained from the init: a step away from it
            start = task.init[m].with_scaling(s)
            A, B = start.A + 0.1 * A, start.B + 0.1 * B
        factors[m] = LoraFactors(A, B, s)
        # its model: W - B0 A0 (folded) + s B A, so its change is s B A - B0 A0
        change[m] = s * B.double() @ A.double()
        if task.fold:
            change[m] -= task.init[m].delta().double()
    return ClientResult(task.client, task.round, factors=factors, examples=10 + task.client), change


def merged(srv: Server) -> dict[str, torch.Tensor]:
    """What every client's base holds beyond W0: the history (float64)."""
    return {m: sum(u.factors[m].delta().double() for u in srv.history) for m in SHAPES}


@pytest.mark.parametrize(
    ("budget", "fraction", "downlink"),
    [
        (0, 1.0, "fp32"),
        (6, 1.0, "fp32"),
        (7, 0.5, "fp32"),
        (6, 1.0, "fp16"),
        (0, 0.5, "fp16"),
        (6, 1.0, "bf16"),
        (6, 1.0, "int8"),
        (0, 0.5, "int8"),
    ],
)
def test_base_plus_carry_is_every_rounds_exact_average(budget, fraction, downlink):
    # Prepare
    srv, g = server(budget, fraction, downlink=downlink), torch.Generator().manual_seed(0)
    truth = {m: torch.zeros(o, i, dtype=torch.float64) for m, (o, i) in SHAPES.items()}
    for t in (1, 2, 3):
        tasks = srv.configure(t)
        done = [train(task, g) for task in tasks]
        # Execute
        srv.complete(tasks, done=[task.client for task in tasks])
        outcome = srv.aggregate(t, tasks, [r for r, _ in done])
        assert outcome is not None
        # Assert: W0 + history + carry = W0 + sum over rounds of the weighted average change
        weights = [r.examples for r, _ in done]
        for m in SHAPES:
            average = sum(w * c[m] for w, (_, c) in zip(weights, done, strict=True)) / sum(weights)
            truth[m] += average
        carry = srv.adapter or {}
        for m in SHAPES:
            ours = merged(srv)[m] + (carry[m].delta().double() if m in carry else 0)
            torch.testing.assert_close(ours, truth[m], rtol=0, atol=2e-5 * truth[m].abs().max())
        if budget == 0 and downlink == "fp32":
            assert srv.adapter is None  # unbounded: nothing carried (FLoRA's guarantee)
        if downlink != "fp32":  # fewer bytes on the wire; the rounding is carried
            update = srv.history[-1]
            assert update.wire == downlink
            for f in update.factors.values():  # what merges is what the wire holds, exactly
                on = on_grid(f, downlink)
                assert torch.equal(on.A, f.A) and torch.equal(on.B, f.B)
            bound = {"fp16": 1e-3, "bf16": 1e-2, "int8": 5e-2}[downlink]  # of the round's update
            assert 0 < outcome.fields["rounding_share"] < bound


def test_clients_start_warm_from_the_top_components_of_the_last_update():
    srv, g = server(budget=0), torch.Generator().manual_seed(1)
    tasks = srv.configure(1)
    assert all(t.init is None and not t.fold for t in tasks)  # round 1: FLoRA's fresh LoRAs
    results = [train(task, g)[0] for task in tasks]
    srv.complete(tasks, done=[t.client for t in tasks])
    srv.aggregate(1, tasks, results)
    last = srv.history[-1].factors
    for task in srv.configure(2):
        assert task.fold and task.init is not None
        for m in SHAPES:
            # the best rank-r_k approximation of the last update (Eckart-Young), from its SVD
            U, S, Vh = torch.linalg.svd(last[m].delta().double())
            r = task.rank
            best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            torch.testing.assert_close(task.init[m].delta().double(), best, rtol=0, atol=1e-5)


def test_a_warm_init_pads_with_fresh_components_that_can_train():
    update = LoraFactors(torch.randn(2, 10), torch.randn(12, 2), 1.0)
    init = warm_init(update, 4, torch.Generator().manual_seed(0))
    assert (
        init.rank == 4
        and torch.equal(init.A[:2], update.A)
        and torch.equal(init.B[:, :2], update.B)
    )
    assert init.A[2:].abs().min() > 0 and not init.B[:, 2:].any()  # PEFT's init: A random, B zero


@pytest.mark.parametrize("budget", [5, 8])
def test_no_client_downloads_more_than_the_budget(budget):
    srv, g = server(budget), torch.Generator().manual_seed(2)
    per_rank = sum(o + i for o, i in SHAPES.values()) * 4  # fp32 bytes of one rank, all modules
    for t in (1, 2, 3):
        tasks = srv.configure(t)
        assert all(task.bytes_down <= budget * per_rank for task in tasks), t
        results = [train(task, g)[0] for task in tasks]
        srv.complete(tasks, done=[task.client for task in tasks])
        outcome = srv.aggregate(t, tasks, results)
        assert outcome is not None and outcome.fields["downlink_rank"] <= budget - max(RANKS)


def test_a_budget_that_cannot_hold_the_largest_warm_init_is_one_line():
    with pytest.raises(FloraError, match="federation.options.budget = 4: .* at least 5"):
        server(budget=4)


def test_without_warm_it_is_floras_fresh_start_with_a_bounded_downlink():
    srv, g = server(budget=6, warm=False), torch.Generator().manual_seed(3)
    for t in (1, 2):
        tasks = srv.configure(t)
        assert all(task.init is None and not task.fold for task in tasks)
        results = [train(task, g)[0] for task in tasks]
        srv.complete(tasks, done=[task.client for task in tasks])
        srv.aggregate(t, tasks, results)
    assert all(u.factors["m"].rank <= 2 for u in srv.history)
