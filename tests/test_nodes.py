"""`fedtune server` and `fedtune client` as real processes on loopback: TLS, one backbone per node."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.results import RunDirectory

REPO = Path(__file__).resolve().parents[1]
FEDTUNE = [sys.executable, "-m", "fedtune"]
QUICK = ["federation.rounds=2", "train.unfreeze=[]", "data.image_size=32"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_listening(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with code {server.returncode}:\n{server.communicate()[0][-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s")


def _sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs") / "tls"
    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), str(directory)], check=True, capture_output=True)
    return directory


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
        [*FEDTUNE, "server", str(REPO / "configs/quickstart.yaml"), "--host", "127.0.0.1", "--port", str(_free_port()),
         "--certs", str(certs), "--state-dir", str(tmp_path / "state"),
         *_sets(*QUICK, "federation.connect_timeout=3", f"output.dir={tmp_path / 'runs'}")],
        capture_output=True, text=True, timeout=300,
    )
    assert server.returncode == 1, server.stderr[-2000:]
    assert "error: the run ended finished:failed" in server.stderr


def _client(port: int, certs: Path, cache: Path, partition: int, *, key: Path, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [*FEDTUNE, "client", "--server", f"127.0.0.1:{port}", "--root-certificates", str(certs / "ca.crt"),
         "--partition-id", str(partition), "--num-partitions", "3", "--cache-dir", str(cache),
         "--auth-key", str(key), "--port", str(_free_port())],
        start_new_session=True, **popen,  # type: ignore[call-overload]
    )


def test_server_and_three_authenticated_clients_over_tls_on_loopback(tmp_path: Path, certs: Path) -> None:
    """The acceptance run: 3 rounds of the default config; an unknown node is turned away."""
    keys = tmp_path / "keys"
    for name in ("node-0", "node-1", "node-2", "stranger"):
        subprocess.run([*FEDTUNE, "keygen", str(keys / name)], check=True, capture_output=True)
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    for p in range(3):
        (authorized / f"node-{p}.pub").write_bytes((keys / f"node-{p}.pub").read_bytes())
    port = _free_port()
    runs = tmp_path / "runs"
    server = subprocess.Popen(
        [*FEDTUNE, "server", str(REPO / "configs/quickstart.yaml"), "--host", "127.0.0.1", "--port", str(port),
         "--certs", str(certs), "--state-dir", str(tmp_path / "state"), "--authorized-keys", str(authorized),
         # the default config for 3 rounds: its unfreezing (from round 4) would fall outside them
         *_sets("federation.rounds=3", "train.unfreeze=[]", "federation.num_clients=3", f"output.dir={runs}")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    clients = [_client(port, certs, tmp_path / f"node-{p}", p, key=keys / f"node-{p}",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in range(3)]
    stranger_log = tmp_path / "stranger.log"
    try:
        _wait_until_listening(port, server)  # a SuperNode that finds no SuperLink retries; this one must be refused
        with stranger_log.open("w") as log:
            stranger = _client(port, certs, tmp_path / "stranger", 0, key=keys / "stranger", stdout=log,
                               stderr=subprocess.STDOUT)
            stranger.wait(timeout=180)
        output, _ = server.communicate(timeout=600)
    finally:
        for client in clients:  # a SuperNode waits for the next run forever
            os.killpg(client.pid, signal.SIGTERM)
        server.kill()
    refusal = stranger_log.read_text()
    assert stranger.returncode != 0 and "Failed to activate SuperNode" in refusal, refusal[-2000:]
    assert "--authorized-keys" in refusal  # fedtune's hint on what to do
    assert server.returncode == 0, output[-3000:]
    (run_dir,) = runs.glob("quickstart-*")
    history = RunDirectory.load_history(run_dir / "history.json")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r.clients_ok for r in history[1:]] == [3, 3, 3]
    assert history[-1].central_accuracy > 0.6 and history[-1].central_accuracy > history[0].central_accuracy + 0.4
    assert sorted(summary["backbone_deliveries_per_node"].values()) == [1, 1, 1]
    assert [r.bytes_sent_backbone > 0 for r in history[1:]] == [True, False, False]
    for p in range(3):  # each node cached the backbone on its own disk
        assert len(list((tmp_path / f"node-{p}" / "models").glob("*.safetensors"))) == 1


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
