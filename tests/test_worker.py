"""`fedtune client`'s long-lived ClientApp worker, with real processes on loopback (no TLS)."""

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

from fedtune.worker import _forget_modules_named_in

REPO = Path(__file__).resolve().parents[1]
NOOP_APP = REPO / "benchmarks" / "noop_app"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_noop(tmp_path: Path, env: dict[str, str], name: str, rounds: int) -> list[dict]:
    """Submit a run of the no-op app; its rounds as the ServerApp recorded them."""
    results = tmp_path / f"{name}.json"
    config = f"rounds={rounds} nodes=1 results='{results}' grid='prompt'"
    submitted = subprocess.run([str(BIN / "flwr"), "run", str(NOOP_APP), "test", "--run-config", config],
                               cwd=tmp_path, env={**env, "FLWR_HOME": str(tmp_path / "cli")},
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    deadline = time.monotonic() + 180
    while not (results.is_file() and "finished" in (record := json.loads(results.read_text()))):
        assert time.monotonic() < deadline, f"run {name} did not finish"
        time.sleep(0.5)
    return record["rounds"]


def test_one_worker_serves_every_message_and_is_restarted_when_killed(tmp_path: Path) -> None:
    port = _free_port()
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # This checkout's fedtune (and server/grid.py, which the no-op ServerApp imports) in every process.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--port", str(port), "--disable-runtime-dependency-installation"],
        cwd=tmp_path, env={**env, "FLWR_HOME": str(tmp_path / "link")}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while superlink.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    client_log = tmp_path / "client.log"
    with open(client_log, "w") as log:
        client = subprocess.Popen(
            [sys.executable, "-m", "fedtune", "client", "--insecure", "--server", f"127.0.0.1:{port}",
             "--port", str(_free_port()), "--partition-id", "0"],
            cwd=tmp_path, env={**env, "FLWR_HOME": str(tmp_path / "node")}, start_new_session=True,
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        first = _run_noop(tmp_path, env, "first", rounds=3)
        pids = {pid for r in first for pid in r["pids"]}
        assert [r["replies"] for r in first] == [1, 1, 1] and len(pids) == 1  # one process, three messages
        (worker,) = pids
        os.kill(worker, signal.SIGKILL)
        second = _run_noop(tmp_path, env, "second", rounds=1)
        assert second[0]["replies"] == 1 and second[0]["pids"] != [worker]
        assert client.poll() is None  # the node itself carried on
        assert "the ClientApp worker exited with code -9; starting another" in client_log.read_text()
        os.kill(client.pid, signal.SIGTERM)  # only `fedtune client`: its SuperNode and worker must not outlive it
        client.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(second[0]["pids"][0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(second[0]["pids"][0])
    finally:
        for process in (client, superlink):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # nothing left of it
                pass
            process.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_new_bundle_is_imported_from_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the worker does before loading the app of a bundle it has not loaded yet.
    for version in ("old", "new"):
        (tmp_path / version / "bundlepkg").mkdir(parents=True)
        (tmp_path / version / "bundlepkg" / "__init__.py").write_text(f"VERSION = {version!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "old"))
    import bundlepkg

    assert bundlepkg.VERSION == "old"
    monkeypatch.syspath_prepend(str(tmp_path / "new"))
    _forget_modules_named_in(tmp_path / "new")
    assert "bundlepkg" not in sys.modules
    import bundlepkg as reloaded

    assert reloaded.VERSION == "new"
    del sys.modules["bundlepkg"]
