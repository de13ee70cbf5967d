"""Methods' lives across rounds (flora.aggregation.lifecycle): plans, state, what merges."""

from __future__ import annotations

import pytest
import torch

from flora.aggregation import METHODS, aggregate
from flora.aggregation.lifecycle import (
    BOTH,
    GlobalLora,
    MergeEachRound,
    check_parts,
    initial_lora,
)
from flora.errors import FloraError
from flora.factors import LoraFactors

SHAPES = {"m": (6, 5), "n": (4, 5)}


def _client(rank: int, seed: int, scaling: float = 2.0, A=None):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return {
        m: LoraFactors(
            torch.randn(rank, i, generator=g) if A is None else A[m],
            torch.randn(o, rank, generator=g),
            scaling,
        )
        for m, (o, i) in SHAPES.items()
    }


@pytest.mark.parametrize(
    ("method", "kind", "trains"),
    [
        ("flora", MergeEachRound, BOTH),
        ("florist", MergeEachRound, BOTH),
        ("fedex-lora", MergeEachRound, BOTH),
        ("fedit", GlobalLora, BOTH),
        ("zero-padding", GlobalLora, BOTH),
        ("flexlora", GlobalLora, BOTH),
        ("ffa-lora", GlobalLora, frozenset("B")),
    ],
)
def test_each_method_keeps_the_life_it_had(method, kind, trains):
    lifecycle = METHODS[method].lifecycle
    assert type(lifecycle) is kind and lifecycle.trains == trains


def test_a_global_lora_starts_as_peft_inits_and_plans_each_clients_truncation():
    # Prepare
    lifecycle = GlobalLora(trains=frozenset("B"))
    state = lifecycle.start(SHAPES, [4, 2, 2], seed=3)
    # Execute
    plan = lifecycle.plan(state, client=1, rank=2, round=1)
    # Assert: width max(ranks), B zero, the client's rank-2 slice, B alone travels down
    lora = lifecycle.adapter(state)
    assert lora is not None and all(f.rank == 4 and not f.B.any() for f in lora.values())
    assert plan.init is not None and all(f.rank == 2 for f in plan.init.values())
    assert plan.trains == frozenset("B")
    assert plan.bytes_down == sum(o * 2 * 4 for o, _ in SHAPES.values())
    for m, f in initial_lora(SHAPES, 4, 3).items():
        assert torch.equal(lora[m].A, f.A)


def test_a_global_lora_advances_to_the_aggregate_at_the_widest_rank():
    lifecycle = GlobalLora()
    state = lifecycle.start(SHAPES, [4, 2], seed=0)
    result = aggregate("zero-padding", [_client(2, 1), _client(2, 2)], [1.0, 1.0])
    step = lifecycle.advance(state, result, 1, [4, 2])
    # a round of rank-2 clients still leaves a rank-4 global LoRA (zero-padded), nothing merged
    lora = lifecycle.adapter(step.state)
    assert lora is not None and all(f.rank == 4 for f in lora.values())
    assert step.merged is None and step.residual is None
    for m in SHAPES:
        torch.testing.assert_close(lora[m].delta(), result.global_factors[m].delta())


def test_merging_each_round_keeps_no_state_and_merges_the_realised_update():
    lifecycle = MergeEachRound()
    result = aggregate("fedex-lora", [_client(2, 1), _client(2, 2)], [3.0, 1.0])
    step = lifecycle.advance(lifecycle.start(SHAPES, [2, 2], 0), result, 1, [2, 2])
    assert step.state == {} and lifecycle.adapter(step.state) is None
    assert step.merged is result.global_factors and step.residual is result.residual


@pytest.mark.parametrize("trains", [(), ("A", "core"), ("C",)])
def test_a_plan_that_trains_nothing_or_an_unknown_part_is_refused(trains):
    with pytest.raises(FloraError, match="a client trains a non-empty subset of"):
        check_parts(trains, "trains")
