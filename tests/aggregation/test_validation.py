"""One test per class of bad input: the error names the client, the module and the fix."""

from __future__ import annotations

import math

import pytest
import torch

from flora.aggregation import aggregate
from flora.errors import FloraError
from flora.factors import LoraFactors

from .conftest import make_clients

M = "layers.0.q_proj"


def _replace(client, module, **changes):
    f = client[module]
    client[module] = LoraFactors(
        changes.get("A", f.A), changes.get("B", f.B), changes.get("s", f.scaling)
    )


def test_missing_module():
    clients = make_clients([4, 4])
    del clients[1]["layers.1.q_proj"]
    with pytest.raises(FloraError, match=r"client 1 lacks 'layers.1.q_proj'.*same target modules"):
        aggregate("flora", clients)


def test_extra_module():
    clients = make_clients([4, 4])
    clients[1]["layers.9.q_proj"] = clients[1][M]
    with pytest.raises(FloraError, match="client 1 has extra module 'layers.9.q_proj'"):
        aggregate("flora", clients)


def test_rank_mismatch_between_A_and_B():
    clients = make_clients([4, 4])
    _replace(clients[1], M, B=torch.randn(24, 3))
    with pytest.raises(FloraError, match=rf"client 1, module '{M}'.*A must be \(r, in\)"):
        aggregate("flora", clients)


def test_layer_shape_mismatch():
    clients = make_clients([4, 4])
    _replace(clients[1], M, A=torch.randn(4, 17))
    with pytest.raises(FloraError, match=rf"client 1, module '{M}'.*same base model"):
        aggregate("flora", clients)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values(bad):
    clients = make_clients([4, 4])
    B = clients[0][M].B.clone()
    B[2, 1] = bad
    _replace(clients[0], M, B=B)
    with pytest.raises(FloraError, match=rf"client 0, module '{M}': lora_B holds NaN or inf"):
        aggregate("flora", clients)


def test_large_finite_values_are_accepted():
    clients = make_clients([2])
    _replace(clients[0], M, A=torch.full((2, 16), 3e38))  # the sum overflows; values do not
    aggregate("flora", clients)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "1 given for 2 clients"),
        ([1.0, 0.0], "client 1 has weight 0.0"),
        ([1.0, -2.0], "client 1 has weight -2.0"),
        ([math.nan, 1.0], "client 0 has weight nan"),
    ],
)
def test_bad_weights(weights, match):
    with pytest.raises(FloraError, match=match):
        aggregate("flora", make_clients([4, 2]), weights)


@pytest.mark.parametrize("method", ["fedit", "ffa-lora", "fedex-lora"])
def test_equal_rank_methods_refuse_mixed_ranks(method):
    with pytest.raises(FloraError, match=rf"{method} needs equal ranks: client 1.*use flora"):
        aggregate(method, make_clients([4, 2]))


def test_ffa_lora_needs_a_shared_A():
    with pytest.raises(FloraError, match="same frozen lora_A.*shared seed"):
        aggregate("ffa-lora", make_clients([4, 4]))


def test_bad_scaling():
    clients = make_clients([4, 4])
    _replace(clients[1], M, s=0.0)
    with pytest.raises(FloraError, match="scaling 0.0 must be positive"):
        aggregate("flora", clients)


def test_unknown_method_and_option():
    with pytest.raises(FloraError, match="method 'fedavg' is unknown; choose one of: flora"):
        aggregate("fedavg", make_clients([4]))
    with pytest.raises(FloraError, match="unknown option 'tau'"):
        aggregate("flora", make_clients([4]), tau=0.5)
    with pytest.raises(FloraError, match="tau=1.5 is out of range"):
        aggregate("florist", make_clients([4]), tau=1.5)


def test_no_clients():
    with pytest.raises(FloraError, match="at least one adapter"):
        aggregate("flora", [])


@pytest.mark.parametrize(
    ("value", "finite"), [(math.nan, False), (math.inf, False), (-math.inf, False), (3e38, True)]
)
def test_a_result_is_finite_unless_it_holds_nan_or_inf(value, finite):
    # 3e38 twice overflows the sum (inf) though every value is finite: the elementwise check
    # then decides, as the server's check of a realised update must
    result = aggregate("flora", make_clients([4, 4]))
    factors = result.global_factors[M]
    factors.A[0, :2] = value
    assert result.is_finite() is finite
