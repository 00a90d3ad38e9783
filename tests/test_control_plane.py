"""Acceptance: only `fedtune server` itself submits, stops and lists runs and registers node keys.

A real `fedtune server` with TLS and node keys on loopback, and one authorised `fedtune client`.
An outsider holding the CA certificate tries the stock `flwr` CLI against the server's port; an
insider also holding a registered node key signs its requests as that SuperNode does, with
Flower's own HTTP clients. Every attempt is refused, and the federation completes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.control_pb2 import ListRunsRequest, RegisterNodeRequest, StartRunRequest, StopRunRequest
from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
from flwr.proto.runtime_pb2 import PullAppMessagesRequest
from flwr.supercore.control.control_http_client import ControlHttpClient
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
from real_nodes import REPO, LoopbackFederation, make_certs

from fedtune.report import RunDirectory

QUICKSTART = REPO / "configs" / "quickstart.yaml"
QUICK = ["federation.rounds=2", "train.unfreeze=[]", "data.image_size=32"]
FLWR = str(Path(sys.executable).parent / "flwr")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs") / "tls")


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FLWR, *args], env={**os.environ, "FLWR_HOME": str(home)}, cwd=home.parent,
                          capture_output=True, text=True, timeout=120)


def _connection(home: Path, name: str, address: str, ca: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
                                      f'address = "{address}"\nroot-certificates = "{ca}"\n')
    return home


def _running_run(state: Path, server: subprocess.Popen, log: Callable[[], str]) -> int:
    """The id of the run `fedtune server` submitted, read as its operator would, on the server machine."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert server.poll() is None, log()[-3000:]
        if not (state / "flwr-home" / "config.toml").is_file():  # not started yet
            time.sleep(2)
            continue
        listing = _flwr(state / "flwr-home", "ls", "fedtune", "--format", "json")
        runs = json.loads(listing.stdout).get("runs", []) if listing.returncode == 0 else []
        if runs and runs[0]["status"] == "running":
            return int(runs[0]["run-id"])
        time.sleep(2)
    raise AssertionError(f"no run was running after 240 s:\n{log()[-3000:]}")


def _refusal(result: subprocess.CompletedProcess) -> str:
    """Why the CLI failed (with --format json it exits 0 and says so in its output); "" if it succeeded."""
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        return result.stdout + result.stderr
    return "" if answer.get("success") else str(answer.get("error-message"))


def test_the_network_can_neither_list_stop_register_nor_run(tmp_path: Path, certs: Path) -> None:
    nodes = LoopbackFederation(tmp_path, certs, num_clients=1)
    runs = tmp_path / "runs"
    address, ca = f"127.0.0.1:{nodes.port}", certs / "ca.crt"
    try:
        nodes.start_client(0)
        server = nodes.start_server(QUICKSTART, *QUICK, f"output.dir={runs}")
        run_id = _running_run(tmp_path / "state", server, lambda: nodes.log("server.log"))

        # An outsider with the CA certificate, and the stock CLI pointed at the server's port.
        outsider = _connection(tmp_path / "outsider", "target", address, ca)
        intruder_key = nodes.make_key("intruder")
        attempts = {
            "list runs": ("ls", "target", "--format", "json"),
            "stop the run": ("stop", str(run_id), "target", "--format", "json"),
            "register a key": ("supernode", "register", f"{intruder_key}.pub", "target", "--format", "json"),
            "run its own app": ("run", str(REPO / "benchmarks" / "noop_app"), "target", "--format", "json"),
        }
        for what, args in attempts.items():
            result = _flwr(outsider, *args)
            assert "403 Forbidden" in _refusal(result), f"{what}: {result.stdout[-1500:]}{result.stderr[-1500:]}"

        # An insider: a registered node's key, signing every request as its SuperNode does.
        node_key = serialization.load_ssh_private_key((nodes.keys / "node-0").read_bytes(), password=None)
        assert isinstance(node_key, ec.EllipticCurvePrivateKey)
        signed = [RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                  NodeAuthHttpInterceptor(node_key, node_key.public_key())]
        control = ControlHttpClient.from_server_address(address, False, str(ca), signed)
        runtime = RuntimeHttpClient.from_server_address(address, False, str(ca), signed)
        intruder = serialization.load_ssh_private_key(intruder_key.read_bytes(), password=None)
        calls = {
            "list runs": lambda: control.ListRuns(ListRunsRequest()),
            "stop the run": lambda: control.StopRun(StopRunRequest(run_id=run_id)),
            "register a key": lambda: control.RegisterNode(
                RegisterNodeRequest(public_key=public_key_to_bytes(intruder.public_key()))),
            "run its own app": lambda: control.StartRun(StartRunRequest()),
            "take the ServerApp's messages": lambda: runtime.PullMessages(PullAppMessagesRequest()),
        }
        for what, call in calls.items():
            with pytest.raises(httpx.HTTPStatusError) as refused:
                call()
            assert refused.value.response.status_code == 403, what
        # The one registration path the gateway lets through is the Fleet API's own, which the
        # SuperLink closes when node keys are on.
        fleet = FleetHttpClient.from_server_address(
            address, False, str(ca), [NodeAuthHttpInterceptor(intruder, intruder.public_key())])
        with pytest.raises(httpx.HTTPStatusError):
            fleet.RegisterNode(RegisterNodeFleetRequest(public_key=public_key_to_bytes(intruder.public_key())))
        for client in (control, runtime, fleet):
            client.close()

        assert nodes.wait(server, 600) == 0, nodes.log("server.log")[-3000:]
    finally:
        nodes.stop()
    log = nodes.log("server.log")
    for path in ("/v1/control/list-runs", "/v1/control/stop-run", "/v1/control/register-node",
                 "/v1/control/start-run", "/v1/runtime/pull-messages"):
        assert f"refused POST {path} from 127.0.0.1:" in log, path
    (run_dir,) = runs.glob("quickstart-*")
    history = RunDirectory.load_history(run_dir / "history.json")
    assert [r.clients_ok for r in history[1:]] == [1, 1]


def test_a_run_stopped_from_the_server_machine_fails_the_server(tmp_path: Path, certs: Path) -> None:
    """`flwr stop` through the server's own loopback connection: `fedtune server` reports it and exits 1."""
    nodes = LoopbackFederation(tmp_path, certs, num_clients=1)
    try:
        # No client joins: the run waits for one, and is stopped meanwhile.
        server = nodes.start_server(QUICKSTART, *QUICK, f"output.dir={tmp_path / 'runs'}")
        run_id = _running_run(tmp_path / "state", server, lambda: nodes.log("server.log"))
        stopped = _flwr(tmp_path / "state" / "flwr-home", "stop", str(run_id), "fedtune", "--format", "json")
        assert json.loads(stopped.stdout)["success"], stopped.stdout + stopped.stderr
        assert nodes.wait(server, 120) == 1
    finally:
        nodes.stop()
    assert f"error: the run ended finished:stopped: run {run_id} was stopped before it completed" in nodes.log(
        "server.log")
