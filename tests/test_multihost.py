"""`fedtune server` and `fedtune client` on separate hosts: each node in its own network namespace.

test_nodes.py runs the same federation on loopback, where a certificate valid for 127.0.0.1 and a
CLI that dials 127.0.0.1 are enough. Here the server listens only on its own address on a private
/24 and every client reaches it through a veth pair and a bridge, as on a real LAN: this exercises
the TLS path with a certificate whose SAN must cover that address, and the server's own CLI
connection to a SuperLink that is not on loopback. The namespaces, links and processes are made by
the test and removed afterwards, even when it fails; where namespaces cannot be made (not root, no
`ip`, a container without CAP_NET_ADMIN) the tests are skipped and say why.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtune.report import RunDirectory

REPO = Path(__file__).resolve().parents[1]
QUICK = ["federation.rounds=2", "train.unfreeze=[]", "data.image_size=32"]
SUBNET = "10.231.87"  # a private /24 that exists only inside the test's namespaces
PORT = 9092  # the server's namespace is the test's alone, so a fixed port cannot collide
NUM_CLIENTS = 2  # two hosts show traffic between namespaces; each more adds torch imports on shared CPUs
VETH = "ftn-veth"  # each node's end of its veth pair, inside the node's namespace
BRIDGE = "ftn-br"


@dataclass(frozen=True)
class Node:
    """One host: a network namespace with one address on the shared bridge, and its own loopback."""

    namespace: str
    address: str

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass(frozen=True)
class Network:
    switch: str  # the namespace that holds the bridge, so the root namespace is never touched
    server: Node
    clients: tuple[Node, ...]

    @property
    def namespaces(self) -> list[str]:
        return [self.switch, self.server.namespace, *(c.namespace for c in self.clients)]


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)


def _add_node(switch: str, node: Node, port_name: str) -> None:
    """A veth pair from the bridge into the node's namespace, the node's address on it, and lo up
    (each SuperNode talks to its ClientApp processes over its own loopback)."""
    _ip("-n", switch, "link", "add", port_name, "type", "veth", "peer", "name", VETH, "netns", node.namespace)
    _ip("-n", switch, "link", "set", port_name, "master", BRIDGE)
    _ip("-n", switch, "link", "set", port_name, "up")
    _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", VETH)
    _ip("-n", node.namespace, "link", "set", VETH, "up")
    _ip("-n", node.namespace, "link", "set", "lo", "up")


def _stop_processes_in(namespace: str) -> None:
    """End every process still in `namespace` (all of them were started by this test): a namespace
    outlives `ip netns del` for as long as a process is inside it, and SuperLink/SuperNode children
    (flower-superexec, flwr-clientapp) run in sessions of their own, out of reach of killpg."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        listing = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
        pids = [int(p) for p in listing.stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
            if not left.split():
                return
            time.sleep(0.2)


def _tear_down(namespaces: list[str]) -> None:
    # Deleting a namespace deletes the links in it, and a veth pair goes with either of its ends.
    for namespace in reversed(namespaces):
        _stop_processes_in(namespace)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    if os.geteuid() != 0:
        pytest.skip("cannot create network namespaces: needs root (CAP_NET_ADMIN)")
    if shutil.which("ip") is None:
        pytest.skip("cannot create network namespaces: the `ip` command (iproute2) is not installed")
    tag = f"ftn{os.getpid()}{secrets.token_hex(2)}"  # unique per run: never reuse someone else's namespace
    net = Network(
        switch=f"{tag}-sw",
        server=Node(f"{tag}-srv", f"{SUBNET}.1"),
        clients=tuple(Node(f"{tag}-c{i}", f"{SUBNET}.{10 + i}") for i in range(NUM_CLIENTS)),
    )
    created: list[str] = []
    try:
        try:
            for namespace in net.namespaces:
                _ip("netns", "add", namespace)
                created.append(namespace)
            _ip("-n", net.switch, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", net.switch, "link", "set", BRIDGE, "up")
            _add_node(net.switch, net.server, "ftn-srv")
            for i, node in enumerate(net.clients):
                _add_node(net.switch, node, f"ftn-c{i}")
        except subprocess.CalledProcessError as error:
            pytest.skip(f"cannot create network namespaces: {(error.stderr or '').strip() or error}")
        yield net
    finally:
        _tear_down(created)


@pytest.fixture(scope="module")
def certs(network: Network, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The server's namespace address in the SAN: the clients and the server's CLI dial it.
    directory = tmp_path_factory.mktemp("certs") / "tls"
    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), str(directory), network.server.address],
                   check=True, capture_output=True)
    return directory


def _env() -> dict[str, str]:
    # The test's checkout, not whichever copy of fedtune is installed, in every process it starts.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _fedtune(node: Node, *argv: str) -> list[str]:
    return node.command(sys.executable, "-m", "fedtune", *argv)


def _sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _can_connect(node: Node, host: str, port: int, wait: float = 0.0) -> bool:
    """Whether a TCP connection from inside `node` to host:port succeeds (retrying for `wait` s)."""
    probe = (
        "import socket, sys, time\n"
        f"deadline = time.monotonic() + {wait}\n"
        "while True:\n"
        "    try:\n"
        f"        socket.create_connection(({host!r}, {port}), timeout=2).close()\n"
        "        sys.exit(0)\n"
        "    except OSError:\n"
        "        if time.monotonic() >= deadline:\n"
        "            sys.exit(1)\n"
        "        time.sleep(0.3)\n"
    )
    return subprocess.run(node.command(sys.executable, "-c", probe), capture_output=True).returncode == 0


def _received_bytes(node: Node) -> int:
    listing = subprocess.run(["ip", "-n", node.namespace, "-j", "-s", "link", "show", VETH],
                             check=True, capture_output=True, text=True)
    return int(json.loads(listing.stdout)[0]["stats64"]["rx"]["bytes"])


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def test_nodes_refuse_to_run_without_tls_in_their_namespaces(network: Network, tmp_path: Path) -> None:
    server = subprocess.run(
        _fedtune(network.server, "server", str(REPO / "configs/quickstart.yaml"), "--host", network.server.address,
                 "--port", str(PORT), "--state-dir", str(tmp_path / "state")),
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert server.returncode == 2, server.stderr[-2000:]
    assert f"serving on {network.server.address} needs TLS" in server.stderr
    client = subprocess.run(
        _fedtune(network.clients[0], "client", "--server", f"{network.server.address}:{PORT}"),
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert client.returncode == 2, client.stderr[-2000:]
    assert "needs TLS: pass --root-certificates" in client.stderr


@pytest.mark.slow  # a real federation across namespaces: minutes on 2 cores
def test_server_and_clients_on_separate_hosts_over_tls(network: Network, certs: Path, tmp_path: Path) -> None:
    server_ip, runs, logs = network.server.address, tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    server_log = logs / "server.log"
    received_before = [_received_bytes(c) for c in network.clients]
    started: list[subprocess.Popen] = []
    try:
        with server_log.open("w") as log:
            server = subprocess.Popen(
                _fedtune(network.server, "server", str(REPO / "configs/quickstart.yaml"), "--host", server_ip,
                         "--port", str(PORT), "--certs", str(certs), "--state-dir", str(tmp_path / "state"),
                         *_sets(*QUICK, f"federation.num_clients={NUM_CLIENTS}", f"output.dir={runs}")),
                stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path, start_new_session=True,
            )
        started.append(server)
        # The server is reachable from another host only through the bridge, and it listens on its
        # veth address alone: its own loopback does not answer, so nothing below can be loopback.
        assert _can_connect(network.clients[0], server_ip, PORT, wait=90), _tail(server_log)
        assert not _can_connect(network.server, "127.0.0.1", PORT)
        assert not _can_connect(network.clients[0], "127.0.0.1", PORT)
        for p, node in enumerate(network.clients):
            with (logs / f"client-{p}.log").open("w") as log:
                started.append(subprocess.Popen(
                    _fedtune(node, "client", "--server", f"{server_ip}:{PORT}",
                             "--root-certificates", str(certs / "ca.crt"), "--partition-id", str(p),
                             "--num-partitions", str(NUM_CLIENTS), "--cache-dir", str(tmp_path / f"node-{p}")),
                    stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path, start_new_session=True,
                ))
        code = server.wait(timeout=500)
    finally:
        for process in reversed(started):  # a SuperNode waits for the next run forever
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for namespace in (network.server.namespace, *(c.namespace for c in network.clients)):
            _stop_processes_in(namespace)  # the SuperLink's and SuperNodes' detached children too
    client_logs = "\n".join(f"--- client {p}\n{_tail(logs / f'client-{p}.log', 800)}" for p in range(NUM_CLIENTS))
    assert code == 0, f"{_tail(server_log, 3000)}\n{client_logs}"

    (run_dir,) = runs.glob("quickstart-*")
    history = RunDirectory.load_history(run_dir / "history.json")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r.clients_ok for r in history[1:]] == [NUM_CLIENTS, NUM_CLIENTS]
    assert history[-1].central_accuracy > history[0].central_accuracy + 0.3
    assert sorted(summary["backbone_deliveries_per_node"].values()) == [1] * NUM_CLIENTS
    assert history[2].bytes_sent_backbone == 0
    for p in range(NUM_CLIENTS):  # each host cached the backbone on its own disk
        assert len(list((tmp_path / f"node-{p}" / "models").glob("*.safetensors"))) == 1
    # The backbone really crossed each client's veth: at least its share of the delivered bytes came in.
    per_node_backbone = summary["bytes_sent_backbone_total"] // NUM_CLIENTS
    received = [_received_bytes(c) - before for c, before in zip(network.clients, received_before, strict=True)]
    assert all(r >= per_node_backbone for r in received), (received, per_node_backbone)
