"""Real nodes failing: a client killed mid-run, a server killed with SIGKILL and started again."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from real_nodes import REPO, LoopbackFederation, make_certs, wait_for_checkpoint
from safetensors.torch import load_file

from fedtune.report import RunDirectory

# Two and three real federations of real processes: minutes each on 2 cores, so not in the default run.
pytestmark = pytest.mark.slow

QUICKSTART = REPO / "configs" / "quickstart.yaml"
# Small and private: FedAdam keeps moments on the server, DP-SGD keeps a ledger on each client.
SMALL_PRIVATE = ["federation.rounds=3", "train.unfreeze=[]", "data.image_size=32", "train.local_epochs=1",
                 "strategy.name=fedadam", "privacy.dp_sgd.enabled=true", "privacy.dp_sgd.target_epsilon=null",
                 "privacy.dp_sgd.noise_multiplier=1.0", "privacy.dp_sgd.reproducible=true"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs") / "tls")


@pytest.fixture
def federation(tmp_path: Path, certs: Path):  # noqa: ANN201 - a LoopbackFederation
    nodes = LoopbackFederation(tmp_path, certs, num_clients=2)
    yield nodes
    nodes.stop()


def _steps(ledger: dict) -> int:
    return sum(steps for _, _, steps in ledger["history"])


def _epsilons(record: object) -> dict[str, float]:
    return {k: v for k, v in record.extra.items() if k.startswith("epsilon_client_")}  # type: ignore[attr-defined]


def test_server_killed_mid_run_resumes_to_the_uninterrupted_model(federation: LoopbackFederation) -> None:
    for partition in range(2):
        federation.start_client(partition)  # they outlive both servers, reconnecting to each
    reference_runs = federation.root / "reference-runs"
    reference = federation.start_server(QUICKSTART, *SMALL_PRIVATE, f"output.dir={reference_runs}",
                                        state="reference-state", log_name="reference.log")
    assert federation.wait(reference, 600, "reference.log") == 0, federation.log("reference.log")[-3000:]

    runs = federation.root / "runs"
    command = (QUICKSTART, *SMALL_PRIVATE, f"output.dir={runs}")
    server = federation.start_server(*command)
    run_dir = wait_for_checkpoint(runs, 1, server, timeout=300)
    os.kill(server.pid, signal.SIGKILL)  # the fedtune process only, as `kill -9 PID` would
    server.wait()
    time.sleep(3)  # its SuperLink follows it (parent-death signal), freeing the port

    restarted = federation.start_server(*command, log_name="restarted.log")  # the same command
    assert federation.wait(restarted, 600, "restarted.log") == 0, federation.log("restarted.log")[-3000:]
    assert f"resuming {run_dir}" in federation.log("restarted.log")

    (reference_dir,) = reference_runs.iterdir()
    expected = load_file(reference_dir / "model.safetensors")
    final = load_file(run_dir / "model.safetensors")
    assert final.keys() == expected.keys()
    assert [k for k in final if not torch.equal(final[k], expected[k])] == []  # bit-identical
    history = RunDirectory.load_history(run_dir / "history.json")
    assert [r.round for r in history] == [0, 1, 2, 3] and all(r.clients_ok == 2 for r in history[1:])
    assert len(list(runs.iterdir())) == 1  # resumed in place, no second run folder
    # Each client kept one ledger for the run across the server's two lives.
    for partition in range(2):
        assert len(list((federation.cache(partition) / "privacy").glob("run-quickstart-*.json"))) == 2  # + reference


def test_client_killed_mid_round_rejoins_with_its_ledger(tmp_path: Path, certs: Path) -> None:
    nodes = LoopbackFederation(tmp_path, certs, num_clients=3)
    try:
        clients = [nodes.start_client(p) for p in range(3)]
        runs = tmp_path / "runs"
        server = nodes.start_server(QUICKSTART, *SMALL_PRIVATE, "federation.round_timeout=300",
                                    f"output.dir={runs}")
        wait_for_checkpoint(runs, 1, server, timeout=300)
        # Round 2 starts as soon as round 1 is checkpointed: its train messages are on their way.
        os.killpg(clients[2].pid, signal.SIGKILL)
        clients[2].wait()
        ledger_file = next((nodes.cache(2) / "privacy").glob("run-*.json"))
        ledger_before = json.loads(ledger_file.read_text())
        time.sleep(5)
        nodes.start_client(2)  # the same node (key, cache) comes back
        assert nodes.wait(server, 600) == 0, nodes.log("server.log")[-3000:]
    finally:
        nodes.stop()

    (run_dir,) = runs.iterdir()
    history = RunDirectory.load_history(run_dir / "history.json")
    assert [r.clients_ok for r in history[1:]] == [3, 2, 3]  # round 2 went on without it; round 3 with it
    assert history[2].clients_failed == 1
    ledger_after = json.loads(ledger_file.read_text())
    # Intact: same noise and sampling rate, and the steps before the kill still counted, with round 3's on top.
    assert [entry[:2] for entry in ledger_after["history"]] == [entry[:2] for entry in ledger_before["history"]]
    assert _steps(ledger_after) > _steps(ledger_before)
    first, last = _epsilons(history[1]), _epsilons(history[3])
    rejoined = set(last) - (set(_epsilons(history[2])))
    assert len(rejoined) == 1 and last[rejoined.pop()] > max(first.values())
