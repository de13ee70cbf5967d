"""raFLoRA against its paper's claims: with equal ranks it is FlexLoRA; with mixed ranks each
rank partition is weighted by the clients covering it, which stops the "rank collapse" that
FlexLoRA's rank-agnostic weights cause (the energy beyond the smallest rank shrinking
geometrically over rounds)."""

from __future__ import annotations

import torch

from flora.aggregation import aggregate
from flora.aggregation.lowrank import lowrank_svd
from flora.aggregation.raflora import partition_weights
from flora.factors import LoraFactors


def clients(ranks: list[int], seed: int = 0) -> list[dict[str, LoraFactors]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"m": LoraFactors(torch.randn(r, 10, generator=g), torch.randn(12, r, generator=g), 8 / r)}
        for r in ranks
    ]


def test_with_equal_ranks_it_is_flexlora():
    ups = clients([3, 3, 3])
    ours = aggregate("raflora", ups, [1.0, 2.0, 3.0])
    flex = aggregate("flexlora", ups, [1.0, 2.0, 3.0])
    torch.testing.assert_close(
        ours.global_factors["m"].delta(), flex.global_factors["m"].delta(), rtol=0, atol=1e-5
    )
    assert ours.bytes_up == flex.bytes_up and ours.bytes_down == flex.bytes_down


def test_each_partition_is_weighted_by_the_clients_covering_it():
    assert partition_weights([4, 2, 1], [0.5, 0.3, 0.2]).tolist() == [1.0, 0.8, 0.5, 0.5]
    ups = clients([4, 2, 1])
    p = [0.5, 0.3, 0.2]
    covered = partition_weights([4, 2, 1], p)
    expected = sum(
        p[k] * f.scaling * f.B[:, i : i + 1] @ f.A[i : i + 1] / covered[i]
        for k, c in enumerate(ups)
        for f in [c["m"]]
        for i in range(f.rank)
    )
    # 12 x 10 with a stacked rank of 7: the global truncation at r_max = 4 is not the whole
    # sum, so compare the SVD's top 4 of the expected sum with the global factors
    U, S, Vh = torch.linalg.svd(expected.double())
    top = (U[:, :4] * S[:4]) @ Vh[:4]
    result = aggregate("raflora", ups, p)
    torch.testing.assert_close(result.global_factors["m"].delta().double(), top, rtol=0, atol=1e-4)
    assert [d["m"].rank for d in result.client_factors] == [4, 2, 1]


def energy_beyond(lora: LoraFactors, rank: int) -> float:
    _, S, _ = lowrank_svd(lora.B, lora.A)
    return float(S[rank:].square().sum() / S.square().sum())


def test_flexlora_collapses_onto_the_smallest_rank_and_raflora_does_not():
    # Prepare: a global LoRA of rank 4 with even energy; one rank-4 client (weight 0.25) and
    # three rank-1 clients; nobody trains: each sends back what it received
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(12, 4, generator=g))
    P, _ = torch.linalg.qr(torch.randn(10, 4, generator=g))
    start = LoraFactors(P.T.contiguous(), Q.contiguous(), 1.0)
    shares = {}
    for method in ("flexlora", "raflora"):
        downloads = [{"m": start}] + [{"m": LoraFactors(start.A[:1], start.B[:, :1], 1.0)}] * 3
        for _ in range(5):
            result = aggregate(method, downloads, [1.0, 1.0, 1.0, 1.0])
            downloads = result.client_factors
        shares[method] = energy_beyond(result.global_factors["m"], 1)
    # Assert: FlexLoRA shrinks components 2..4 by 0.25 a round (energy by 0.0625); raFLoRA
    # keeps them (the initial share beyond rank 1 is 3/4)
    assert shares["flexlora"] < 3 * 0.0625**5
    assert abs(shares["raflora"] - 0.75) < 1e-4
