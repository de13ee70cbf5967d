"""Methods describe themselves: the registry entries against the maths and the config."""

from __future__ import annotations

import inspect

import pytest

from flora.aggregation import METHODS
from flora.config import load_config
from flora.errors import FloraError


@pytest.mark.parametrize("name", list(METHODS))
def test_registry_options_are_the_methods_keyword_options(name):
    method = METHODS[name]
    params = inspect.signature(method.run).parameters.values()
    keywords = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == {o.name: o.default for o in method.options}


def test_flags_follow_the_registry():
    assert [m.name for m in METHODS.values() if m.freezes_A] == ["ffa-lora", "fedsvd"]
    for method in METHODS.values():
        assert method.merges_into_base is not method.keeps_global_lora
        assert method.summary and method.paper


def test_method_options_come_from_one_table_checked_at_load():
    config = load_config(
        "configs/tiny.toml", ["federation.method='florist'", "federation.options.energy='squared'"]
    )
    assert config.federation.options == {"tau": 0.9, "energy": "squared"}  # florist's energy
    assert load_config("configs/tiny.toml").federation.options == {}  # flora has none


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.options.tau=0.5"], "federation.options.tau is not an option of flora"),
        (
            ["federation.method='florist'", "federation.options.tau=0"],
            "federation.options.tau=0.0 is out of range",
        ),
        (
            ["federation.method='florist'", "federation.options.energy='cube'"],
            "federation.options.energy='cube' is unknown; use one of",
        ),
        (
            [
                "federation.method='zero-padding'",
                "lora.ranks=[4, 2, 2]",
                "federation.options.weighting=1",
            ],
            "federation.options.weighting=1: expected a str",
        ),
        (["federation.tau=0.5"], "federation.tau' moved: write it as federation.options.tau"),
    ],
)
def test_bad_method_options_are_refused_before_any_training(overrides, message):
    with pytest.raises(FloraError, match=message):
        load_config("configs/tiny.toml", overrides)
