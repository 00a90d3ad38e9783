"""`flwr run .` on this project: Flower's own CLI, a local SuperLink, Ray simulation, our ServerApp."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_superlink(port: int) -> None:
    # `flwr run` leaves the local SuperLink it started running; end ours (and only ours).
    found = subprocess.run(["pgrep", "-f", f"flower-superlink.*--port {port}"], capture_output=True, text=True)
    for pid in found.stdout.split():
        os.kill(int(pid), signal.SIGTERM)


def test_flwr_run_completes_the_default_config_with_dp_sgd(tmp_path: Path) -> None:
    # The CLIs of the environment running the tests, whether or not it is activated.
    bin_dir = Path(sys.executable).parent
    flwr = bin_dir / "flwr"
    assert flwr.is_file(), "the flwr CLI comes with the flwr dependency"
    port = _free_port()
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # Otherwise every run reinstalls the dependencies into a fresh environment (GBs).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    runs = tmp_path / "runs"
    # The 2 simulation nodes play 4 virtual clients, each with its own DP-SGD ledger.
    overrides = (f"federation.num_clients=4;federation.rounds=1;train.unfreeze=[];data.image_size=32;output.dir={runs};"
                 "privacy.dp_sgd.enabled=true;privacy.dp_sgd.target_epsilon=8")
    try:
        result = subprocess.run(
            [str(flwr), "run", str(REPO), "--stream",
             "--federation-config", "num-supernodes=2 client-resources-num-cpus=1",
             "--run-config", f"set='{overrides}'"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
        )
    finally:
        _stop_superlink(port)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    run_dirs = list(runs.glob("quickstart-*"))
    assert len(run_dirs) == 1, output[-3000:]
    files = {p.name for p in run_dirs[0].iterdir()}
    assert {"config.json", "config.yaml", "history.json", "history.csv", "model.safetensors", "summary.json",
            "accuracy.png", "bytes.png", "privacy.json", "privacy.png"} <= files
    history = json.loads((run_dirs[0] / "history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [0, 1]
    assert history[1]["clients_ok"] == 4
    assert history[1]["central_accuracy"] > history[0]["central_accuracy"]
    epsilons = {k: v for k, v in history[1]["extra"].items() if k.startswith("epsilon_client_")}
    assert sorted(epsilons) == [f"epsilon_client_{client}" for client in range(4)]
    assert 0 < max(epsilons.values()) <= 8
