"""A federation of real `fedtune server` / `fedtune client` processes on loopback, for tests.

TLS certificates come from deploy/make-certs.sh and node keys from `fedtune keygen`, as a user
would make them; every process is stopped with its whole process group when the test ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedtune import ports
from fedtune.server.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError

REPO = Path(__file__).resolve().parents[1]
FEDTUNE = [sys.executable, "-m", "fedtune"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def make_certs(directory: Path) -> Path:
    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), str(directory)], check=True, capture_output=True)
    return directory


def wait_until_listening(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    def check_alive() -> None:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with code {server.returncode} before listening")

    if not ports.wait_until_listening(port, timeout=timeout, check_alive=check_alive, interval=0.5):
        raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s")


class LoopbackFederation:
    """One server port, authenticated clients, logs under `root/logs`."""

    def __init__(self, root: Path, certs: Path, num_clients: int) -> None:
        self.root, self.certs, self.num_clients = root, certs, num_clients
        self.port = free_port()
        self.keys = root / "keys"
        self.authorized = root / "authorized"
        self.authorized.mkdir(parents=True)
        self.logs = root / "logs"
        self.logs.mkdir()
        self.processes: list[subprocess.Popen] = []
        for partition in range(num_clients):
            self.make_key(f"node-{partition}")
            (self.authorized / f"node-{partition}.pub").write_bytes((self.keys / f"node-{partition}.pub").read_bytes())

    def make_key(self, name: str) -> Path:
        subprocess.run([*FEDTUNE, "keygen", str(self.keys / name)], check=True, capture_output=True)
        return self.keys / name

    def _start(self, command: list[str], log_name: str) -> subprocess.Popen:
        with (self.logs / log_name).open("a") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.processes.append(process)
        return process

    def start_server(self, config: Path, *overrides: str, state: str = "state", log_name: str = "server.log"
                     ) -> subprocess.Popen:
        return self._start(
            [*FEDTUNE, "server", str(config), "--host", "127.0.0.1", "--port", str(self.port), "--certs",
             str(self.certs), "--state-dir", str(self.root / state), "--authorized-keys", str(self.authorized),
             *sets(f"federation.num_clients={self.num_clients}", *overrides)],
            log_name,
        )

    def start_client(self, partition: int, *, key: str | None = None, give_up_after: float = 600,
                     own_data: Path | None = None) -> subprocess.Popen:
        """Client `partition` (its cache: `cache(partition)`); with `own_data`, that folder whole instead."""
        key_name = key or f"node-{partition}"
        data = ["--data", str(own_data)] if own_data else ["--partition-id", str(partition), "--num-partitions",
                                                            str(self.num_clients)]
        return self._start(
            [*FEDTUNE, "client", "--server", f"127.0.0.1:{self.port}", "--root-certificates",
             str(self.certs / "ca.crt"), *data, "--cache-dir", str(self.cache(partition)),
             "--auth-key", str(self.keys / key_name), "--port", str(free_port()),
             "--give-up-after", str(give_up_after)],
            f"{key_name}.log",
        )

    def cache(self, partition: int) -> Path:
        return self.root / f"cache-{partition}"

    def log(self, name: str) -> str:
        path = self.logs / name
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, process: subprocess.Popen, timeout: float, log_name: str = "server.log") -> int:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self.log(log_name)[-3000:]}") from None

    def stop(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def wait_for_checkpoint(runs: Path, round_: int, server: subprocess.Popen, timeout: float) -> Path:
    """The run folder once its checkpoint covers `round_` completed rounds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server ended (code {server.returncode}) before round {round_} completed")
        for checkpoint in runs.glob(f"*/{CHECKPOINT_FILE}"):
            try:
                if Checkpoint.load(checkpoint).round >= round_:
                    return checkpoint.parent
            except CheckpointError:  # replaced while being read
                pass
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint of round {round_} under {runs} after {timeout:.0f} s")


def serve_once(root: Path, config: Path, task: list[str], overrides: list[str], *, clients: int = 2
               ) -> LoopbackFederation:
    """`fedtune server CONFIG TASK...` over TLS with node keys on `clients` loopback client nodes, run until it
    exits 0 (asserted, with the end of its log); every process is stopped. Returns the federation, whose
    node caches stay on disk."""
    nodes = LoopbackFederation(root, make_certs(root / "certs"), num_clients=clients)
    try:
        for partition in range(clients):
            nodes.start_client(partition)
        server = nodes._start(
            [*FEDTUNE, "server", str(config), "--host", "127.0.0.1", "--port", str(nodes.port), "--certs",
             str(nodes.certs), "--state-dir", str(root / "state"), "--authorized-keys", str(nodes.authorized),
             *task, *sets(*overrides)],
            "server.log")
        wait_until_listening(nodes.port, server)
        assert nodes.wait(server, 900) == 0, nodes.log("server.log")[-3000:]
    finally:
        nodes.stop()
    return nodes
