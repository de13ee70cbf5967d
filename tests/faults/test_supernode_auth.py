"""SuperNode authentication on a real loopback deployment (scripts/flower-deploy.sh --auth).

The SuperLink runs with Flower's ``--enable-supernode-auth``: each node's public key is
registered with ``flwr supernode register`` before it starts, and a node holding a key the
SuperLink never saw (``--intruder``, posing as partition 0) is refused when it activates, so it
never receives a message. TLS is on (``--auth`` implies ``--tls``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower tests need `pip install -e '.[flower]'`")

from tests.processes import alive_in_groups, deploy

from flora.metrics import read_metrics

pytestmark = pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")),
    reason="--auth needs openssl and ssh-keygen",
)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    overrides = "federation.num_clients=2;lora.ranks=[8, 4];federation.rounds=1"
    tmp = tmp_path_factory.mktemp("auth")
    return deploy(tmp, "--auth", "--intruder", "-n", "2", "-s", overrides)


def test_registered_nodes_train_over_tls(deployment):
    done, run_dir = deployment
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished:completed" in done.stderr
    logs = run_dir / "logs"
    registered = re.findall(r"SuperNode (\d+) registered", (logs / "register.log").read_text())
    assert len(registered) == 2
    node_logs = [(logs / f"supernode-{k}.log").read_text() for k in (0, 1)]
    ids = [re.findall(r"SuperNode ID: (\d+)", log)[0] for log in node_logs]
    assert sorted(ids) == sorted(registered)  # each node runs under its own key
    link = (logs / "superlink.log").read_text()
    assert "Uvicorn running on https://" in link  # TLS, not plain HTTP
    servers = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "server"]
    assert [(r["clients"], r["failed"]) for r in servers] == [([0, 1], [])]


def test_an_unregistered_node_is_refused(deployment):
    _, run_dir = deployment
    logs = run_dir / "logs"
    intruder = (logs / "intruder.log").read_text()
    assert "Failed to activate SuperNode" in intruder
    assert "SuperNode ID" not in intruder  # it never got a node id, so never a message
    link = (logs / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link
    assert link.count("Activated node_id=") == 2
    groups = {int(p) for p in (logs / "pids").read_text().split()}
    assert len(groups) == 6  # SuperLink, two workers, two SuperNodes and the intruder
    assert alive_in_groups(groups) == []


def test_intruder_without_auth_is_a_usage_error(tmp_path):
    done = subprocess.run(
        ["bash", "scripts/flower-deploy.sh", "--intruder", "-n", "1", "-o", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "flower-deploy: --intruder needs --auth"
