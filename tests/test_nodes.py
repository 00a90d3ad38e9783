"""`fedtune server` and `fedtune client` as real processes on loopback: TLS, one backbone per node."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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


def test_server_and_three_clients_over_tls_on_loopback(tmp_path: Path, certs: Path) -> None:
    port = _free_port()
    runs = tmp_path / "runs"
    server = subprocess.Popen(
        [*FEDTUNE, "server", str(REPO / "configs/quickstart.yaml"), "--host", "127.0.0.1", "--port", str(port),
         "--certs", str(certs), "--state-dir", str(tmp_path / "state"),
         *_sets(*QUICK, "federation.num_clients=3", f"output.dir={runs}")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    clients = [
        subprocess.Popen(
            [*FEDTUNE, "client", "--server", f"127.0.0.1:{port}", "--root-certificates", str(certs / "ca.crt"),
             "--partition-id", str(p), "--num-partitions", "3", "--cache-dir", str(tmp_path / f"node-{p}"),
             "--port", str(_free_port())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        for p in range(3)
    ]
    try:
        output, _ = server.communicate(timeout=500)
    finally:
        for client in clients:  # a SuperNode waits for the next run forever
            os.killpg(client.pid, signal.SIGTERM)
        server.kill()
    assert server.returncode == 0, output[-3000:]
    (run_dir,) = runs.glob("quickstart-*")
    history = RunDirectory.load_history(run_dir / "history.json")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r.clients_ok for r in history[1:]] == [3, 3]
    assert history[-1].central_accuracy > history[0].central_accuracy + 0.3
    assert sorted(summary["backbone_deliveries_per_node"].values()) == [1, 1, 1]
    assert history[2].bytes_sent_backbone == 0
    for p in range(3):  # each node cached the backbone on its own disk
        assert len(list((tmp_path / f"node-{p}" / "models").glob("*.safetensors"))) == 1
