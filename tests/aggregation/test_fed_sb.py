"""Fed-SB against its paper's claim: with every client on one frozen A and B, averaging the r x r
cores is exact, every round, at r^2 bytes per module each way whatever the number of clients;
round 1 (FLoRA's) sets the frame from its exact update's SVD; a client trains its core only."""

from __future__ import annotations

import pytest
import torch

from flora.aggregation import aggregate
from flora.aggregation.fed_sb import frame_of
from flora.client import ClientResult
from flora.config import load_config
from flora.factors import LoraFactors
from flora.server import Server
from flora.training import TrainConfig, train_client

from .conftest import TINY_TARGETS, exact_round

SHAPES = {"m": (12, 10), "n": (6, 10)}
RANK = 3


def server(clients: int = 4, fraction: float = 1.0) -> Server:
    overrides = [
        f"lora.ranks={[RANK] * clients}",
        f"federation.num_clients={clients}",
        "federation.method='fed-sb'",
        f"federation.fraction={fraction}",
    ]
    return Server(load_config("configs/tiny.toml", overrides), SHAPES)


def train(task, g: torch.Generator) -> tuple[ClientResult, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """Round 1: a fresh LoRA; later: the core moved, A sent as R A, B as received. And the
    client's model change (float64)."""
    s = task.alpha / task.rank
    factors, change = {}, {}
    for m, (o, i) in SHAPES.items():
        if task.init is None:
            A, B = torch.randn(RANK, i, generator=g), torch.randn(o, RANK, generator=g)
            factors[m] = LoraFactors(A, B, s)
            change[m] = s * B.double() @ A.double()
            continue
        assert task.trains == {"R"} and task.core is not None
        sent = task.init[m].with_scaling(s)
        R = task.core[m] + 0.1 * torch.randn(RANK, RANK, generator=g)
        factors[m] = LoraFactors(R @ sent.A, sent.B, s)
        before = task.init[m].B.double() @ task.core[m].double() @ task.init[m].A.double()
        change[m] = s * sent.B.double() @ (R @ sent.A).double() - before
    result = ClientResult(task.client, task.round, factors=factors, examples=5 + 3 * task.client)
    return result, change


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_every_round_realises_the_weighted_sum_and_costs_r_squared(fraction):
    srv, g = server(4, fraction), torch.Generator().manual_seed(0)
    got_frame: set[int] = set()
    for t in (1, 2, 3, 4):
        tasks, outcome = exact_round(srv, t, lambda task: train(task, g))
        if t == 1:
            continue
        cores = RANK * RANK * len(SHAPES) * 4
        frame = RANK * sum(o + i for o, i in SHAPES.values()) * 4
        assert outcome.report.bytes_up == [cores] * len(tasks)
        for task in tasks:  # the frame once per client, then the cores alone
            catch_up = sum(u.nbytes() for u in task.catch_up)
            first = task.client not in got_frame
            assert task.bytes_down == cores + (frame if first else 0) + catch_up
            got_frame.add(task.client)


def test_round_one_sets_an_orthonormal_frame_and_the_top_singular_values_as_core():
    srv, g = server(), torch.Generator().manual_seed(1)
    tasks = srv.configure(1)
    assert all(task.init is None for task in tasks)  # FLoRA's fresh LoRAs
    results = [train(task, g)[0] for task in tasks]
    srv.complete(tasks, done=[t.client for t in tasks])
    srv.aggregate(1, tasks, results)
    task = srv.configure(2)[0]
    for m in SHAPES:
        A, B, R = task.init[m].A, task.init[m].B, task.core[m]
        torch.testing.assert_close(A @ A.T, torch.eye(RANK), rtol=0, atol=1e-5)
        torch.testing.assert_close(B.T @ B, torch.eye(RANK), rtol=0, atol=1e-5)
        assert torch.equal(R, torch.diag(torch.diagonal(R)))  # S_r
        assert (torch.diagonal(R)[:-1] >= torch.diagonal(R)[1:]).all()


def test_the_frame_of_a_rank_deficient_update_pads_with_zero_components():
    g = torch.Generator().manual_seed(2)
    update = LoraFactors(torch.randn(1, 10, generator=g), torch.randn(12, 1, generator=g), 1.0)
    frame, core, rest = frame_of(update, 3)
    assert rest.rank == 1 and not rest.delta().any()  # nothing beyond the frame to merge
    torch.testing.assert_close(frame.B @ core @ frame.A, update.delta(), rtol=0, atol=1e-5)
    assert frame.rank == 3 and core[1:, 1:].abs().sum() == 0


def test_the_pure_aggregate_averages_cores_under_a_shared_B_and_stacks_otherwise():
    g = torch.Generator().manual_seed(3)
    B = torch.randn(12, 3, generator=g)
    clients = [{"m": LoraFactors(torch.randn(3, 10, generator=g), B, 2.0)} for _ in range(3)]
    result = aggregate("fed-sb", clients, [1.0, 2.0, 3.0])
    expected = sum(w * 2.0 * B @ c["m"].A for w, c in zip([1, 2, 3], clients, strict=True)) / 6
    torch.testing.assert_close(result.global_factors["m"].delta(), expected, rtol=0, atol=1e-5)
    assert result.bytes_up == [3 * 3 * 4] * 3 and result.bytes_down == [3 * 3 * 4] * 3
    fresh = [{"m": LoraFactors(c["m"].A, c["m"].B + k, 2.0)} for k, c in enumerate(clients)]
    assert aggregate("fed-sb", fresh, [1.0, 2.0, 3.0]).global_factors["m"].rank == 9


@pytest.mark.usefixtures("torch_single_thread")
def test_a_client_trains_its_core_only(tiny_model, token_examples, tokenizer):
    g = torch.Generator().manual_seed(4)
    modules = TINY_TARGETS
    init, core = {}, {}
    for m, (o, i) in modules.items():
        A, _ = torch.linalg.qr(torch.randn(i, 2, generator=g))
        B, _ = torch.linalg.qr(torch.randn(o, 2, generator=g))
        init[m] = LoraFactors(A.T.contiguous(), B.contiguous(), 1.0)
        core[m] = torch.diag(torch.tensor([0.3, 0.1]))
    config = TrainConfig(precision="fp32", lr=1e-2, batch_size=2, max_steps=2, lora_dropout=0.0)
    local = train_client(
        tiny_model,
        token_examples,
        rank=2,
        alpha=4.0,
        config=config,
        seed=0,
        pad_id=tokenizer.pad_token_id,
        init=init,
        trains={"R"},
        core=core,
    )
    for m, f in local.factors.items():
        sent = init[m].with_scaling(f.scaling)
        assert torch.equal(f.B, sent.B)  # B frozen
        R = f.A @ init[m].A.T  # A = R A_init: in the frame's row space
        torch.testing.assert_close(R @ init[m].A, f.A, rtol=0, atol=1e-5)
        assert not torch.allclose(R, core[m], atol=1e-6)  # the core trained
    assert not any(n for n, _ in tiny_model.named_modules() if "lora" in n)  # unloaded
