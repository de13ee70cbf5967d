"""Every shipped config loads and validates; bad keys and values name the dotted key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flora.config import config_fingerprint, config_to_dict, load_config, load_run_config
from flora.errors import FloraError

CONFIGS = sorted(Path("configs").glob("*.toml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"default.toml", "tiny.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert len(config.client_ranks()) == (
        1 if config.federation.centralized else config.federation.num_clients
    )
    assert "flora run" in path.read_text().splitlines()[1]  # the launch command in the header


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.rounds=0"], "federation.rounds must be >= 1"),
        (["federation.method='fedavg'"], "federation.method must be one of"),
        (["federation.speed=3"], "unknown config key 'federation.speed'"),
        (["train.lr=-1"], "train.lr must be a finite number >= 0"),
        (["train.batch_size='big'"], "train.batch_size: expected int"),
        (["lora.ranks='huge'"], "lora.ranks must be a list of ints or a profile"),
        (["lora.ranks=[8, 4]"], "lora.ranks must be one rank per client (3 clients)"),
        (["federation.method='fedit'"], "fedit needs equal ranks"),
        (["data.partition='random'"], "data.partition must be one of"),
        (["rounds"], "expected key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(FloraError, match=re.escape(message)):
        load_config("configs/tiny.toml", overrides)


def test_overrides_and_profiles():
    config = load_config("configs/tiny.toml", ["lora.ranks='hetero-3'", "train.lr=0.5"])
    assert config.client_ranks() == [16, 8, 4] and config.train.lr == 0.5


def test_missing_file():
    with pytest.raises(FloraError, match="not found"):
        load_config("configs/nope.toml")


@pytest.mark.parametrize(
    ("name", "before"),
    [
        ("tiny", "0a5fc12be55f73bde5309e07a8d2f884651afeab2444a626a1c349d7e3dc7634"),
        ("default", "e4f182f0a0b6289d96b15da441e3f9d1a1fc00359772904ecce02f3d09002e1a"),
    ],
)
def test_fields_added_later_keep_the_fingerprints_runs_were_checkpointed_with(name, before):
    # the fingerprints flora recorded before output.report_to, train.optimizer and
    # screening.rank_normalized existed (and the screen's defaults were 100 x, reject): runs
    # checkpointed then still resume (a changed fingerprint is refused as an edited config)
    then = ["screening.norm_multiple=100", "screening.norm_action='reject'", "model.dtype='fp32'"]
    later = ["screening.rank_normalized=false", "train.tf32=false"]  # as such runs resume
    old = load_config(f"configs/{name}.toml", [*then, *later])
    assert config_fingerprint(old) == before
    changed = load_config(f"configs/{name}.toml", [*then, "train.optimizer='sgd'"])
    assert config_fingerprint(changed) != before


def test_a_run_written_before_rank_normalized_resumes_with_raw_norms(tmp_path):
    # Prepare: a run's config.json as flora wrote it before the field existed
    data = config_to_dict(load_config("configs/tiny.toml"))
    del data["screening"]["rank_normalized"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    # Execute / Assert: the screen it ran with (raw norms), not today's default
    assert load_run_config(tmp_path).screening.rank_normalized is False
    assert load_config("configs/tiny.toml").screening.rank_normalized is True
