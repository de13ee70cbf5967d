"""The ServerApp and ClientApp over an in-process Grid: every method against the embedded runtime.

The Grid here hands each message straight to the ClientApp (tests/flower/inline_grid.py), so
these tests exercise the apps' logic (sampling, catch-up, records, node state on disk,
failures) in seconds; test_runtimes.py runs the same apps on Flower's real runtimes.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

import torch
from safetensors.torch import load_file
from tests.flower.inline_grid import InlineGrid

from flora import simulation
from flora.aggregation import METHODS
from flora.config import RunConfig, load_config
from flora.errors import FloraError
from flora.flower.client_app import make_client_app
from flora.flower.server_app import discover_partitions, run_server
from flora.metrics import read_metrics

TINY = "configs/tiny.toml"
# one short step per client and round: the tests compare runtimes, not learning
FAST = [
    "train.max_steps=1",
    "train.batch_size=2",
    "eval.samples=0",
    "data.limit=60",
    "data.heldout=8",
    "data.max_length=48",
]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def run_flower(config: RunConfig, out: Path, **options: object) -> Path:
    grid = InlineGrid(make_client_app(out / "nodes"), config.federation.num_clients)
    run_server(grid, config, out / "flower", dict(options))  # type: ignore[arg-type]
    return out / "flower"


def rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def checkpoint(run_dir: Path, round: int) -> dict[str, torch.Tensor]:
    """The round's merged update and the method's state (every group), by file and key."""
    directory = run_dir / "checkpoints" / f"round_{round:04d}"
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        if path.name not in ("rng.safetensors", "sketches.safetensors"):
            tensors |= {f"{path.name}:{k}": v for k, v in load_file(path).items()}
    return tensors


def assert_same_rounds(flower: Path, embedded: Path, rounds: int, atol: float = 0.0) -> None:
    for t in range(1, rounds + 1):
        ours, theirs = checkpoint(flower, t), checkpoint(embedded, t)
        assert ours and ours.keys() == theirs.keys(), t
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_with_partial_participation_matches_the_embedded_runtime(tmp_path, method):
    # Prepare: 2 of 3 clients a round, so some client catches up on a round it missed.
    fraction = 0.6
    ranks = [4, 2, 2] if METHODS[method].mixed_ranks else [2, 2, 2]
    overrides = [
        *FAST,
        f"federation.method='{method}'",
        f"federation.fraction={fraction}",
        f"lora.ranks={ranks}",
        "federation.rounds=2",
    ]
    config = load_config(TINY, overrides)
    # Execute
    flower = run_flower(config, tmp_path)
    embedded = tmp_path / "embedded"
    simulation.run(config, embedded, quiet=True)
    # Assert: the same updates, base model and losses, bit for bit
    assert_same_rounds(flower, embedded, 2)
    ours, theirs = (load_file(d / "final/model/model.safetensors") for d in (flower, embedded))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for kind, key in (("eval", "heldout_loss"), ("client", "train_loss")):
        assert [r[key] for r in rows(flower, kind)] == [r[key] for r in rows(embedded, kind)]
    if not METHODS[method].keeps_global_lora and fraction < 1:
        assert max(r["catch_up_rounds"] for r in rows(flower, "client")) == 1


def test_svd_catch_up_gives_the_embedded_updates_to_float_precision(tmp_path):
    # rank 24: two missed rounds stack 48 rows, more than v_proj's 32, so the exact re-factoring
    # is smaller than the replay whatever training gives (at ranks 8, 4, 2 the 18 stacked rows fit
    # every layer: it was smaller only by the one row of numerical-rank deficiency that SmolLM2's
    # tokenizer's data happened to give, and the tiny tokenizer's does not)
    overrides = [
        *FAST,
        "federation.fraction=0.34",
        "federation.rounds=3",
        "federation.catch_up='svd'",
        "lora.ranks=[24, 24, 24]",
    ]
    # one client a round: client 0 trains in rounds 2 and 3, missing round 1
    config = load_config(TINY, overrides)
    flower = run_flower(config, tmp_path)
    simulation.run(config, tmp_path / "embedded", quiet=True)
    assert max(r["catch_up_rounds"] for r in rows(flower, "client")) == 1  # 2 rounds in 1
    # the re-factored base differs from the replayed one in its last bits; a training step
    # carries that to ~2e-6 of factor entries up to 0.13
    assert_same_rounds(flower, tmp_path / "embedded", 3, atol=1e-5)


def test_a_failed_client_is_left_out_and_catches_up_next_round(tmp_path, fail_client):
    # Prepare: client 1 fails in round 1 (after loading its state, before training)
    fail_client(1, 1)
    config = load_config(TINY, [*FAST, "federation.rounds=2"])
    # Execute
    flower = run_flower(config, tmp_path)
    # Assert
    servers = rows(flower, "server")
    assert [(r["clients"], r["failed"]) for r in servers] == [([0, 2], [1]), ([0, 1, 2], [])]
    caught_up = {
        r["client"]: r["catch_up_rounds"] for r in rows(flower, "client") if r["round"] == 2
    }
    assert caught_up == {0: 1, 1: 1, 2: 1}
    assert servers[0]["global_rank"] == 8 + 2  # ranks 8 and 2 stacked, without client 1's 4


def test_a_bf16_base_on_the_nodes_gives_the_embedded_rounds_bitwise(tmp_path):
    # Prepare: bf16 bases whose fp32 target modules the nodes snapshot; 2 of 3 clients a round
    low = ["model.dtype='bf16'", "train.precision='bf16'", "federation.fraction=0.6"]
    config = load_config(TINY, [*FAST, *low, "federation.rounds=3"])
    grid = InlineGrid(make_client_app(tmp_path / "nodes"), 3, extra={"device": "cpu"})
    # Execute
    run_server(grid, config, tmp_path / "flower", {})
    simulation.run(config, tmp_path / "embedded", quiet=True)
    # Assert
    assert_same_rounds(tmp_path / "flower", tmp_path / "embedded", 3)


def test_a_node_without_the_device_it_names_is_left_out(tmp_path):
    # Prepare: partition 1's node config asks for a GPU this machine does not have
    config = load_config(TINY, [*FAST, "federation.rounds=1"])
    grid = InlineGrid(make_client_app(tmp_path / "nodes"), 3)
    grid.node_config[102]["device"] = "cuda:0"
    # Execute
    run_server(grid, config, tmp_path / "flower", {})
    # Assert: named in the server row, with the fix; the others trained
    (server,) = rows(tmp_path / "flower", "server")
    assert server["clients"] == [0, 2] and server["failed"] == [1]
    assert "device = 'cuda:0' but torch sees no CUDA GPU" in server["errors"]["1"]


def test_a_node_that_lost_its_state_gets_every_update_again(tmp_path):
    # Prepare: partition 0's stored base (after round 1's update) disappears before round 3
    config = load_config(TINY, [*FAST, "federation.rounds=4"])

    def wipe(message):
        if message.metadata.group_id == "3" and message.metadata.dst_node_id == 101:
            (state,) = (tmp_path / "nodes").glob("run-*/partition-0")
            shutil.rmtree(state)

    grid = InlineGrid(make_client_app(tmp_path / "nodes"), 3, before=wipe)
    # Execute
    run_server(grid, config, tmp_path / "flower", {})
    # Assert: left out of round 3, then sent all three merged updates, from the pristine weights
    servers = rows(tmp_path / "flower", "server")
    assert [r["failed"] for r in servers] == [[], [], [0], []]
    round4 = {
        r["client"]: r["catch_up_rounds"]
        for r in rows(tmp_path / "flower", "client")
        if r["round"] == 4
    }
    assert round4 == {0: 3, 1: 1, 2: 1}


def test_client_side_evaluation_agrees_with_the_servers(tmp_path):
    config = load_config(TINY, [*FAST, "federation.fraction=0.34"])
    flower = run_flower(config, tmp_path, **{"client-eval": True})
    evals = rows(flower, "eval")
    server = {r["round"]: r["heldout_loss"] for r in evals if "client" not in r}
    client = {r["round"]: r["heldout_loss"] for r in evals if "client" in r}
    assert server.keys() == client.keys() == {0, 2}
    for t in server:
        assert client[t] == pytest.approx(server[t], abs=1e-6)


def test_zero_padding_partial_participation_regression(tmp_path):
    """Regression: the global LoRA once took the largest rank among *that round's* clients, so a
    later client of higher rank got a too-narrow init (FloraError in train_client). The server now
    keeps it at the largest rank of all clients; both runtimes agree and no client fails."""
    overrides = [
        *FAST,
        "federation.method='zero-padding'",
        "federation.fraction=0.34",
        "federation.rounds=3",
        "lora.ranks=[2, 4, 8]",
    ]
    config = load_config(TINY, overrides)
    simulation.run(config, tmp_path / "embedded", quiet=True)
    flower = run_flower(config, tmp_path)
    assert not any(r.get("failed") for r in rows(flower, "server"))
    assert_same_rounds(flower, tmp_path / "embedded", 3)


@pytest.mark.parametrize(
    ("partitions", "message"),
    [([0, 0], "one node each"), ([0, 5], "partition 5 of 6, but the config has 2 clients")],
)
def test_node_discovery_refuses_duplicate_or_foreign_partitions(partitions, message):
    grid = InlineGrid(make_client_app(), 2)
    grid.node_config = {
        101 + i: {"partition-id": k, "num-partitions": 2} for i, k in enumerate(partitions)
    }
    grid.node_config[102]["num-partitions"] = 2 if partitions[1] != 5 else 6
    with pytest.raises(FloraError, match=message):
        discover_partitions(grid, 2, wait=1)


def test_node_discovery_waits_for_the_nodes_then_gives_up():
    grid = InlineGrid(make_client_app(), 2)
    del grid.node_config[102]  # partition 1's node never connects
    with pytest.raises(
        FloraError, match=r"1 of 2 partitions have a node after 0 s \(none holds \[1\]\)"
    ):
        discover_partitions(grid, 2, wait=0.5)


def test_a_federation_of_another_size_is_refused_at_the_first_answer():
    # Prepare: two nodes of a 2-node federation (Flower's default simulation), 3 clients
    grid = InlineGrid(make_client_app(), 2)
    start = time.monotonic()
    # Execute, Assert: refused with the fix for both kinds of federation, long before node-wait
    with pytest.raises(FloraError) as refused:
        discover_partitions(grid, 3, wait=300)
    assert time.monotonic() - start < 60
    message = str(refused.value)
    assert "holds partition 0 of 2, but the config has 3 clients" in message
    assert "--federation-config 'num-supernodes=3'" in message
    assert "--node-config 'partition-id=K num-partitions=3'" in message
    assert "\n" not in message


def test_flora_errors_reach_flowers_log_as_one_line():
    # Prepare: the record Flower logs when a ServerApp raises (its runner's exc_info=ex)
    try:
        raise FloraError("the config has 3 clients; the fix")
    except FloraError as error:
        refused = logging.LogRecord(
            "flwr", logging.ERROR, __file__, 1, "%s raised an exception", ("ServerApp",),
            (type(error), error, error.__traceback__),
        )  # fmt: skip
    other = logging.LogRecord(
        "flwr", logging.ERROR, __file__, 1, "boom", (), (ValueError, ValueError("x"), None)
    )
    # Execute: the ServerApp module's filter on Flower's logger
    flwr_logger = logging.getLogger("flwr")
    assert flwr_logger.filter(refused) and flwr_logger.filter(other)
    # Assert: flora's refusal is its one line; any other exception keeps its traceback
    assert refused.getMessage() == "flora: the config has 3 clients; the fix"
    assert refused.exc_info is None
    assert other.exc_info is not None


class ServerCrash(Exception):
    """Stands for the ServerApp dying mid-round."""


@pytest.mark.parametrize("method", ["flora", "fedit", "fed-plora"])
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, method):
    # Prepare: the reference run, then one whose ServerApp dies in round 3 after one node
    # already trained (and stored its new base) there
    config = load_config(
        TINY,
        [
            *FAST,
            "federation.rounds=4",
            f"federation.method='{method}'",
            "federation.fraction=0.6",
            # fed-plora: the draws of the resumed rounds come from the checkpointed seed
            f"lora.ranks={[4, 2, 2] if method == 'fed-plora' else [2, 2, 2]}",
        ],
    )
    reference = run_flower(config, tmp_path / "reference")
    trains: list[int] = []

    def crash(message):
        if message.metadata.message_type == "train" and message.metadata.group_id == "3":
            trains.append(message.metadata.dst_node_id)
            if len(trains) == 2:
                raise ServerCrash

    nodes, run_dir = tmp_path / "nodes", tmp_path / "flower"
    with pytest.raises(ServerCrash):
        run_server(InlineGrid(make_client_app(nodes), 3, before=crash), config, run_dir, {})
    assert not (run_dir / "checkpoints" / "round_0003").exists()
    if method == "flora":  # merged updates: the nodes kept their bases
        assert list(nodes.glob("run-*/partition-*/base-*.safetensors"))
    # Execute: a new "Flower run" (new grid) resumes it
    run_server(InlineGrid(make_client_app(nodes), 3), config, run_dir, {}, resume=True)
    # Assert: bitwise the same rounds and model, the same metrics rows, the node state gone
    assert_same_rounds(run_dir, reference, 4)
    ours, theirs = (load_file(d / "final/model/model.safetensors") for d in (run_dir, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for kind, key in (("eval", "heldout_loss"), ("client", "train_loss"), ("server", "clients")):
        assert [r[key] for r in rows(run_dir, kind)] == [r[key] for r in rows(reference, kind)]
    assert not list(nodes.glob("run-*"))


def test_resume_refuses_a_run_that_has_nothing_to_resume(tmp_path):
    config = load_config(TINY, FAST)
    grid = InlineGrid(make_client_app(tmp_path / "nodes"), 3)
    with pytest.raises(FloraError, match="holds no run to resume"):
        run_server(grid, config, tmp_path / "none", {}, resume=True)


def test_nodes_keep_their_state_when_asked(tmp_path):
    config = load_config(TINY, [*FAST, "federation.rounds=2"])
    run_flower(config, tmp_path, **{"keep-node-state": True})
    assert len(list((tmp_path / "nodes").glob("run-*/partition-*"))) == 3


def test_auto_catch_up_sends_one_dense_update_when_it_is_smallest(tmp_path):
    # rank 24, two missed rounds: 48 stacked ranks re-factor to at most min(o, i) = 64 / 32,
    # more bytes than the dense 64x64 and 32x64 deltas, so the dense update is what travels
    # seed 3 samples clients [0, 1], [0, 1], [0, 2]: client 2 misses rounds 1 and 2
    overrides = [
        *FAST,
        "seed=3",
        "federation.fraction=0.34",
        "federation.rounds=3",
        "federation.catch_up='auto'",
        "lora.ranks=[24, 24, 24]",
    ]
    config = load_config(TINY, overrides)
    flower = run_flower(config, tmp_path)
    simulation.run(config, tmp_path / "embedded", quiet=True)
    stale = [r for r in rows(flower, "client") if r["client"] == 2 and r["round"] == 3]
    dense = 4 * (64 * 64 + 32 * 64) * 2  # two layers of each: fp32 (out, in) per module
    assert [(r["catch_up_rounds"], r["bytes_down"]) for r in stale] == [(1, dense)]
    assert_same_rounds(flower, tmp_path / "embedded", 3, atol=1e-5)
