"""The FLoRA reference code's baselines, reproduced defect for defect, against dense formulas."""

from __future__ import annotations

import pytest
import torch

from flora.aggregation import METHODS, aggregate
from flora.errors import FloraError

from .conftest import SHAPES, exact_delta, make_clients, relative_error


def padded(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.zeros(rows, cols, dtype=torch.float64)
    out[: t.shape[0], : t.shape[1]] = t.double()
    return out


def test_reference_fedit_keeps_the_first_clients_adapter_times_p0_on_both_factors():
    # Prepare: equal ranks, unequal weights (p = 1/6, 2/6, 3/6)
    clients = make_clients([4, 4, 4], seed=3)
    # Execute
    result = aggregate("reference-fedit", clients, [1.0, 2.0, 3.0])
    # Assert: B @ A = p_0^2 s_0 B_0 A_0 (the sum went to a misspelt variable), the others unseen
    p0 = 1.0 / 6.0
    for module in SHAPES:
        f = clients[0][module]
        expected = p0 * p0 * f.scaling * (f.B.double() @ f.A.double())
        assert relative_error(result.realised_delta(module), expected) < 1e-6
        assert result.download(2)[module].delta().allclose(result.realised_delta(module))
    changed = [dict(c) for c in clients]
    changed[1] = make_clients([4], seed=99)[0]
    other = aggregate("reference-fedit", changed, [1.0, 2.0, 3.0])
    for module in SHAPES:
        assert torch.equal(other.realised_delta(module), result.realised_delta(module))


def test_reference_fedit_differs_from_flora_fedit():
    clients = make_clients([4, 4], seed=5)
    faithful = aggregate("fedit", clients, [1.0, 1.0])
    defect = aggregate("reference-fedit", clients, [1.0, 1.0])
    for module in SHAPES:
        expected = faithful.realised_delta(module).double()
        assert relative_error(defect.realised_delta(module), expected) > 0.3


@pytest.mark.parametrize("merge_scaling", [16.0, 1.0])
def test_reference_zero_padding_weights_both_factors_and_merges_at_its_scaling(merge_scaling):
    # Prepare: mixed ranks, alpha = 2 r (scaling 2), as the reference code's clients
    ranks, weights = [8, 4, 2], [1.0, 2.0, 5.0]
    clients = make_clients(ranks, seed=11)
    p = [w / sum(weights) for w in weights]
    # Execute
    result = aggregate("reference-zero-padding", clients, weights, merge_scaling=merge_scaling)
    # Assert: m (sum_k p_k s_k pad B_k)(sum_k p_k pad A_k), the clients' scalings folded into B
    for module, (out, inp) in SHAPES.items():
        A = sum(pk * padded(c[module].A, 8, inp) for c, pk in zip(clients, p, strict=True))
        B = sum(
            pk * c[module].scaling * padded(c[module].B, out, 8)
            for c, pk in zip(clients, p, strict=True)
        )
        expected = merge_scaling * (B @ A)
        assert relative_error(result.realised_delta(module), expected) < 1e-6
        # the own terms carry p_k^2: far from FLoRA's exact sum_k p_k s_k B_k A_k
        exact = exact_delta(clients, weights, module)
        assert relative_error(result.realised_delta(module), exact) > 0.1
    assert METHODS["reference-zero-padding"].merges_into_base


def test_reproductions_are_marked_and_refuse_client_level_dp():
    assert sorted(n for n, m in METHODS.items() if m.defect) == [
        "reference-fedit",
        "reference-zero-padding",
    ]
    with pytest.raises(FloraError, match="merge_scaling"):
        aggregate("reference-zero-padding", make_clients([4, 2]), merge_scaling=0.0)
    with pytest.raises(FloraError, match="reference-fedit"):
        aggregate("reference-fedit", make_clients([4, 2]))
