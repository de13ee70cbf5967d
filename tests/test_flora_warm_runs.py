"""flora-warm end to end on the tiny model: both runtimes bitwise equal, every client's downlink
within the budget in every round, and the final model holding everything the clients sent."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flora import simulation
from flora.checkpoint import load_checkpoint
from flora.config import load_config
from flora.factors import adapter_from_tensors
from flora.metrics import read_metrics

TINY = "configs/tiny.toml"
FAST = [
    "train.max_steps=2",
    "train.batch_size=2",
    "eval.samples=0",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=48",
    "lora.ranks=[4, 2, 2]",
]
BUDGET = 6  # ranks of (o + i): the rank-4 client's warm init and a rank-2 merged update

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize("downlink", ["fp32", "fp16", "int8"])
def test_a_bounded_warm_run_is_the_same_on_both_runtimes_and_keeps_its_budget(tmp_path, downlink):
    pytest.importorskip("flwr", reason="the Flower half needs `pip install -e '.[flower]'`")
    from tests.flower.test_apps import assert_same_rounds, rows, run_flower

    # Prepare: 2 of 3 clients a round (a client catches up on a round it missed)
    config = load_config(
        TINY,
        [
            *FAST,
            "federation.method='flora-warm'",
            "federation.rounds=3",
            f"federation.options.budget={BUDGET}",
            f"federation.options.downlink='{downlink}'",
            "federation.fraction=0.6",
        ],
    )
    # Execute
    embedded = tmp_path / "embedded"
    simulation.run(config, embedded, quiet=True)
    flower = run_flower(config, tmp_path)
    # Assert: bitwise equal runtimes
    assert_same_rounds(flower, embedded, 3)
    ours, theirs = (load_file(d / "final/model/model.safetensors") for d in (flower, embedded))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # ... the downlink within the budget for every client that had only the last round to get
    shapes = {k: v.shape for k, v in theirs.items()}
    per_rank = sum(
        s[0] + s[1] for k, s in shapes.items() if k.endswith(("q_proj.weight", "v_proj.weight"))
    )
    for row in rows(embedded, "client"):
        if row["catch_up_rounds"] <= 1:
            assert row["bytes_down"] <= BUDGET * per_rank * 4, row  # fp32 bytes: fp16, int8 less
    servers = rows(embedded, "server")
    assert all(r["downlink_rank"] <= BUDGET - 4 for r in servers)
    assert any(r["carried_rank"] > 0 for r in servers)  # the budget binds: something carried


def test_the_final_model_holds_every_update_and_the_carried_remainder(tmp_path):
    config = load_config(
        TINY,
        [
            *FAST,
            "federation.method='flora-warm'",
            "federation.rounds=2",
            f"federation.options.budget={BUDGET}",
        ],
    )
    simulation.run(config, tmp_path, quiet=True)
    checkpoint = load_checkpoint(tmp_path)
    carry = adapter_from_tensors(checkpoint.method_state["carry"])
    assert carry  # the budget held part of the update back
    final = load_file(tmp_path / "final/model/model.safetensors")
    base = load_file(tmp_path / "final/base/model.safetensors")
    for module, factors in carry.items():
        key = f"{module}.weight"
        learned = sum(u.factors[module].delta() for u in checkpoint.history) + factors.delta()
        torch.testing.assert_close(final[key] - base[key], learned, rtol=0, atol=1e-6)
    servers = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "server"]
    assert servers[-1]["carried_rank"] == max(f.rank for f in carry.values())
