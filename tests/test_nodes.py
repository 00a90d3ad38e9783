"""`fedtune server` and `fedtune client` as real processes on loopback: TLS, one backbone per node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from real_nodes import FEDTUNE, REPO, LoopbackFederation, free_port, make_certs, sets, wait_until_listening

from fedtune.report import RunDirectory

QUICK = ["federation.rounds=2", "train.unfreeze=[]", "data.image_size=32"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs") / "tls")


def test_nodes_refuse_to_run_without_tls_off_loopback(tmp_path: Path) -> None:
    server = subprocess.run([*FEDTUNE, "server", str(REPO / "configs/quickstart.yaml"), "--host", "10.1.2.3",
                             "--state-dir", str(tmp_path)], capture_output=True, text=True)
    assert server.returncode == 2 and "serving on 10.1.2.3 needs TLS" in server.stderr
    client = subprocess.run([*FEDTUNE, "client", "--server", "10.1.2.3:9092"], capture_output=True, text=True)
    assert client.returncode == 2 and "needs TLS: pass --root-certificates" in client.stderr
    missing = subprocess.run([*FEDTUNE, "server", str(REPO / "configs/quickstart.yaml"), "--certs", str(tmp_path),
                              "--state-dir", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 2 and "missing TLS files" in missing.stderr and "make-certs.sh" in missing.stderr


def test_a_failed_run_is_a_failed_server(tmp_path: Path, certs: Path) -> None:
    # No client ever connects: the ServerApp gives up; `flwr run` alone would still exit 0.
    server = subprocess.run(
        [*FEDTUNE, "server", str(REPO / "configs/quickstart.yaml"), "--host", "127.0.0.1", "--port", str(free_port()),
         "--certs", str(certs), "--state-dir", str(tmp_path / "state"),
         *sets(*QUICK, "federation.connect_timeout=3", f"output.dir={tmp_path / 'runs'}")],
        capture_output=True, text=True, timeout=300,
    )
    assert server.returncode == 1, server.stderr[-2000:]
    assert "error: the run ended finished:failed" in server.stderr


def test_server_and_three_authenticated_clients_over_tls_on_loopback(tmp_path: Path, certs: Path) -> None:
    """The acceptance run: 3 rounds of the default config; an unknown node is turned away."""
    nodes = LoopbackFederation(tmp_path, certs, num_clients=3)
    nodes.make_key("stranger")  # a key the server was not given
    runs = tmp_path / "runs"
    try:
        for partition in range(3):
            nodes.start_client(partition)  # before the server: they wait for it
        # The default config for 3 rounds: its unfreezing (from round 4) would fall outside them.
        server = nodes.start_server(REPO / "configs/quickstart.yaml", "federation.rounds=3", "train.unfreeze=[]",
                                    f"output.dir={runs}")
        wait_until_listening(nodes.port, server)
        stranger = nodes.start_client(0, key="stranger", give_up_after=0)
        assert nodes.wait(stranger, 180, "stranger.log") != 0
        assert nodes.wait(server, 600) == 0, nodes.log("server.log")[-3000:]
    finally:
        nodes.stop()
    refusal = nodes.log("stranger.log")
    assert "Failed to activate SuperNode" in refusal and "--authorized-keys" in refusal, refusal[-2000:]
    (run_dir,) = runs.glob("quickstart-*")
    history = RunDirectory.load_history(run_dir / "history.json")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r.clients_ok for r in history[1:]] == [3, 3, 3]
    assert history[-1].central_accuracy > 0.6 and history[-1].central_accuracy > history[0].central_accuracy + 0.4
    assert sorted(summary["backbone_deliveries_per_node"].values()) == [1, 1, 1]
    assert [r.bytes_sent_backbone > 0 for r in history[1:]] == [True, False, False]
    for p in range(3):  # each node cached the backbone on its own disk
        assert len(list((nodes.cache(p) / "models").glob("*.safetensors"))) == 1


def test_authorized_keys_are_checked_before_anything_starts(tmp_path: Path, certs: Path) -> None:
    (tmp_path / "keys.pub").write_text("# the clients\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE9x not-a-key\n")
    server = subprocess.run(
        [*FEDTUNE, "server", str(REPO / "configs/quickstart.yaml"), "--host", "127.0.0.1", "--certs", str(certs),
         "--authorized-keys", str(tmp_path / "keys.pub"), "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True,
    )
    assert server.returncode == 2 and "keys.pub:2" in server.stderr
    assert not (tmp_path / "state").exists()
    insecure = subprocess.run(
        [*FEDTUNE, "server", str(REPO / "configs/quickstart.yaml"), "--host", "127.0.0.1", "--insecure",
         "--authorized-keys", str(tmp_path / "keys.pub"), "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True,
    )
    assert insecure.returncode == 2 and "--authorized-keys needs TLS" in insecure.stderr
