"""Both DP modes in whole runs, on the embedded runtime and the Flower apps: the epsilon rows,
the refusals, a client that does not clip, resuming, and the runtimes' agreement."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from flora import simulation
from flora.aggregation import METHODS
from flora.cli import main
from flora.config import RunConfig, load_config
from flora.errors import FloraError
from flora.metrics import read_metrics
from flora.protocol import initial_lora

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = "configs/tiny.toml"
FAST = [
    "train.max_steps=2",
    "train.batch_size=2",
    "eval.samples=0",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=48",
    "threads=1",
]
DP_SGD = ['privacy.mode="dp-sgd"', "privacy.epsilon=8", "privacy.max_grad_norm=0.5"]
CLIENT = [
    'privacy.mode="client-level"',
    "privacy.epsilon=8",
    "privacy.update_norm=0.05",
    "lora.ranks=[4, 4, 4]",
]


def rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def rdp(noise: float, rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant.get_epsilon(delta=delta)


def run_flower(config: RunConfig, out: Path) -> Path:
    pytest.importorskip("flwr")
    from tests.flower.inline_grid import InlineGrid

    from flora.flower.client_app import make_client_app
    from flora.flower.server_app import run_server

    grid = InlineGrid(make_client_app(out / "nodes"), config.federation.num_clients)
    run_server(grid, config, out / "flower", {})
    return out / "flower"


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS[m].client_dp])
def test_client_level_dp_is_refused_where_it_cannot_hold(method):
    with pytest.raises(FloraError) as error:
        load_config(TINY, [*CLIENT, f"federation.method='{method}'"])
    message = str(error.value)
    assert f"federation.method = '{method}'" in message and "privacy.mode = 'dp-sgd'" in message
    if method in ("flora", "florist"):
        assert "stacks every client's own factors unnoised" in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.sampling='shuffle'", "train.sampling = 'shuffle' with privacy.mode = 'dp-sgd'"),
        ("train.loss_weighting='tokens'", "accounting needs 'examples'"),
        ("train.gradient_checkpointing=true", "would see each recomputed forward twice"),
        ("train.precision='fp16'", "loss scale would be clipped"),
        ("privacy.delta=1.5", "privacy.delta must be in [0, 1)"),
        ("privacy.accountant='gdp'", "privacy.accountant must be one of"),
    ],
)
def test_dp_sgd_settings_that_break_its_accounting_are_refused(override, message):
    with pytest.raises(FloraError, match=re.escape(message)):
        load_config(TINY, [*DP_SGD, override])


def test_client_level_needs_more_than_one_client():
    with pytest.raises(FloraError, match="one client has no others to hide among"):
        load_config(TINY, [*CLIENT, "federation.method='fedit'", "federation.centralized=true"])


# --- dp-sgd -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_dp_sgd_runs_every_method_and_reports_the_accountants_epsilon(tmp_path, method):
    ranks = "[4, 2, 2]" if METHODS[method].mixed_ranks else "[2, 2, 2]"
    config = load_config(
        TINY, [*FAST, *DP_SGD, f"federation.method='{method}'", f"lora.ranks={ranks}"]
    )
    simulation.run(config, tmp_path, quiet=True)
    clients = rows(tmp_path, "client")
    assert len(clients) == 6 and not rows(tmp_path, "fault")
    for row in clients:
        assert row["private_steps"] == 2 * row["round"]
        expected = rdp(
            row["noise_multiplier"], row["sample_rate"], row["private_steps"], row["delta"]
        )
        assert row["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert row["delta"] == 1 / row["examples"]
        assert row["sample_rate"] == 2 / row["examples"]
    assert all(7.9 < r["epsilon"] <= 8.0 for r in clients if r["round"] == 2)


def test_the_epsilon_grows_on_resume_and_a_target_cannot_be_stretched(tmp_path, capsys):
    fixed = ["--set", 'privacy.mode="dp-sgd"', "--set", "privacy.noise_multiplier=1.2"]
    flags = [f for item in FAST for f in ("--set", item)]
    short = tmp_path / "short"
    assert (
        main(
            [
                "run",
                TINY,
                *flags,
                *fixed,
                "--set",
                "federation.rounds=1",
                "--out",
                str(short),
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["run", "--resume", str(short), "--rounds", "3", "--quiet"]) == 0
    by_round = {r["round"]: r for r in rows(short, "client") if r["client"] == 0}
    assert [by_round[t]["private_steps"] for t in (1, 2, 3)] == [2, 4, 6]
    assert by_round[1]["epsilon"] < by_round[2]["epsilon"] < by_round[3]["epsilon"]
    target = tmp_path / "target"
    assert (
        main(
            [
                "run",
                TINY,
                *flags,
                "--set",
                'privacy.mode="dp-sgd"',
                "--set",
                "privacy.epsilon=8",
                "--set",
                "federation.rounds=1",
                "--out",
                str(target),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["run", "--resume", str(target), "--rounds", "2", "--quiet"]) == 2
    assert "privacy.epsilon = 8 over 1 rounds" in capsys.readouterr().err


# --- client-level -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fedit", "ffa-lora", "rolora", "fedsvd"])
def test_client_level_noise_and_epsilon(tmp_path, method):
    config = load_config(
        TINY,
        [
            *FAST,
            *CLIENT,
            f"federation.method='{method}'",
            "federation.fraction=0.6",
            "federation.rounds=3",
        ],
    )
    simulation.run(config, tmp_path, quiet=True)
    servers = rows(tmp_path, "server")
    assert [r["noised_rounds"] for r in servers] == [1, 2, 3]
    for row in servers:
        assert row["sample_rate"] == 2 / 3 and row["delta"] == 1 / 3
        expected = rdp(row["noise_multiplier"], 2 / 3, row["noised_rounds"], 1 / 3)
        assert row["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert 7.9 < servers[-1]["epsilon"] <= 8.0
    lora = load_file(tmp_path / "checkpoints" / "round_0003" / "global_lora.safetensors")
    start = initial_lora(config_shapes(), 4, config.seed)
    for module, factors in start.items():
        A = next(v for k, v in lora.items() if module in k and "lora_A" in k)
        if method == "ffa-lora":  # the frozen A takes no noise
            assert torch.equal(A, factors.A)
        else:
            assert not torch.equal(A, factors.A)


def config_shapes() -> dict[str, tuple[int, int]]:
    return {
        f"model.layers.{i}.self_attn.{p}": (o, 64)
        for i in range(2)
        for p, o in (("q_proj", 64), ("v_proj", 32))
    }


def test_a_client_that_does_not_clip_is_named_and_left_out(tmp_path):
    from tests.faults.tamper import tamper

    config = load_config(TINY, [*FAST, *CLIENT, "federation.method='fedit'"])

    # a nudge past the clipping bound, well inside the screen's norm bounds
    def unclipped(r):
        return dataclasses.replace(
            r, factors={m: dataclasses.replace(f, B=f.B + 0.01) for m, f in r.factors.items()}
        )

    undo = tamper(1, 2, unclipped)
    try:
        simulation.run(config, tmp_path, quiet=True)
    finally:
        undo()
    faults = rows(tmp_path, "fault")
    assert [(f["round"], f["client"]) for f in faults] == [(2, 1)]
    assert "exceeds privacy.update_norm = 0.05 (not clipped on the client)" in faults[0]["reason"]
    assert rows(tmp_path, "server")[1]["clients"] == [0, 2]


# --- both runtimes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "method"), [("dp-sgd", "flora"), ("client-level", "fedit")])
def test_the_flower_apps_give_the_embedded_private_rounds_bitwise(tmp_path, mode, method):
    extra = DP_SGD if mode == "dp-sgd" else CLIENT
    overrides = [
        *FAST,
        *extra,
        f"federation.method='{method}'",
        "privacy.reproducible_noise=true",
        "federation.fraction=0.6",
    ]
    config = load_config(TINY, overrides)
    flower = run_flower(config, tmp_path)
    simulation.run(config, tmp_path / "embedded", quiet=True)
    for name in ("model.safetensors",):
        ours = load_file(flower / "final" / "model" / name)
        theirs = load_file(tmp_path / "embedded" / "final" / "model" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for kind in ("client", "server"):
        keys = ("epsilon", "noise_multiplier", "private_steps", "noised_rounds")
        pick = [{k: r.get(k) for k in keys} for r in rows(flower, kind)]
        assert pick == [{k: r.get(k) for k in keys} for r in rows(tmp_path / "embedded", kind)]


def test_the_dry_run_prints_every_clients_noise_and_budget(capsys):
    assert (
        main(
            [
                "run",
                TINY,
                "--dry-run",
                "--set",
                'privacy.mode="dp-sgd"',
                "--set",
                "privacy.epsilon=8",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    lines = out.split("DP-SGD per client")[1].strip().splitlines()[2:5]
    assert [int(line.split()[0]) for line in lines] == [0, 1, 2]
    assert all(7.9 < float(line.split()[-1]) <= 8.0 for line in lines)


def test_flower_sims_nodes_train_with_dp_sgd_and_match_the_embedded_run(tmp_path):
    # Flower's own simulation runtime (Ray, the ClientApp in its workers): the nodes run DP-SGD
    # themselves and the accounting and the update match the embedded runtime's
    pytest.importorskip("flwr")
    extra = [
        *FAST,
        *DP_SGD,
        "privacy.reproducible_noise=true",
        "federation.num_clients=2",
        "lora.ranks=[8, 4]",
    ]
    flags = [f for item in extra for f in ("--set", item)]
    sim = tmp_path / "sim"
    assert main(["run", TINY, *flags, "--runtime", "flower-sim", "--out", str(sim), "--quiet"]) == 0
    simulation.run(load_config(TINY, extra), tmp_path / "embedded", quiet=True)
    keys = ("client", "round", "epsilon", "private_steps", "noise_multiplier")
    ours = [{k: r[k] for k in keys} for r in rows(sim, "client")]
    assert ours == [{k: r[k] for k in keys} for r in rows(tmp_path / "embedded", "client")]
    assert all(7.9 < r["epsilon"] <= 8.0 for r in ours if r["round"] == 2)
    for t in (1, 2):
        name = f"checkpoints/round_{t:04d}/update.safetensors"
        a, b = load_file(sim / name), load_file(tmp_path / "embedded" / name)
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
