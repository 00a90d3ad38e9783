"""`fedtune client`'s ClientApp worker, with real processes on loopback (no TLS): it runs this node's
own fedtune and nothing the server sends; it is restarted when it dies and stopped with the node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOOP_APP = REPO / "benchmarks" / "noop_app"
BIN = Path(sys.executable).parent
# A ClientApp a hostile server would like to run on the node: it leaves a trace at import and
# copies out the node's settings (data folder, cache) when it handles a message.
SPY = """
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

TRACE = Path({trace!r})
TRACE.write_text("imported on the node")
client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    TRACE.write_text(repr(dict(context.node_config)))
    return Message(RecordDict(), reply_to=msg)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spy_app(tmp_path: Path, trace: Path) -> Path:
    """benchmarks/noop_app with its ClientApp replaced by the spy (its ServerApp records the replies)."""
    app = tmp_path / "spy_app"
    shutil.copytree(NOOP_APP, app)
    (app / "spy.py").write_text(SPY.format(trace=str(trace)))
    pyproject = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(pyproject.replace('clientapp = "noopapp:client"', 'clientapp = "spy:client"'))
    return app


def _run(app: Path, tmp_path: Path, env: dict[str, str], name: str) -> list[dict]:
    """Submit one round of `app`; its round as the no-op ServerApp recorded it."""
    results = tmp_path / f"{name}.json"
    config = f"rounds=1 nodes=1 results='{results}' grid='flower'"
    submitted = subprocess.run([str(BIN / "flwr"), "run", str(app), "test", "--run-config", config],
                               cwd=tmp_path, env={**env, "FLWR_HOME": str(tmp_path / "cli")},
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    deadline = time.monotonic() + 240
    while not (results.is_file() and "finished" in (record := json.loads(results.read_text()))):
        assert time.monotonic() < deadline, f"run {name} did not finish"
        time.sleep(0.5)
    return record["rounds"]


def _children(pid: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_bytes()
            if entry.name.isdigit() and int(stat[stat.rfind(b")") + 2:].split()[1]) == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _wait_for(condition, timeout: float, what: str) -> None:  # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_an_app_that_is_not_the_nodes_fedtune_is_refused_and_never_run(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    app = _spy_app(tmp_path, trace)
    port = _free_port()
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # A plain SuperLink, so that a foreign app can be submitted to it: the stand-in for a compromised server.
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--port", str(port), "--disable-runtime-dependency-installation"],
        cwd=tmp_path, env={**env, "FLWR_HOME": str(tmp_path / "link")}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait_for(lambda: superlink.poll() is None and _listening(port), 60, "the SuperLink did not start")
    client_log = tmp_path / "client.log"
    with open(client_log, "w") as log:
        client = subprocess.Popen(
            [sys.executable, "-m", "fedtune", "client", "--insecure", "--server", f"127.0.0.1:{port}",
             "--port", str(_free_port()), "--partition-id", "0", "--data", str(tmp_path),
             "--cache-dir", str(tmp_path / "cache")],
            cwd=tmp_path, env={**env, "FLWR_HOME": str(tmp_path / "node")}, start_new_session=True,
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        (first,) = _run(app, tmp_path, env, "first")
        assert first["replies"] == 0
        (reason,) = first["errors"]
        assert reason.startswith("app bundle ") and "it is not this node's fedtune (fedtune/fedtune 0.1.0)" in reason
        assert "name 'fedtune-noop' (this node: 'fedtune')" in reason and "'clientapp': 'spy:client'" in reason
        assert not trace.exists()  # never imported, never handed the node's settings
        assert reason in client_log.read_text()  # and the node's operator sees why

        # The worker dies (an app that crashed it, say): the node starts another, which refuses too.
        (worker,) = [pid for pid, command in _children(client.pid).items() if "fedtune.worker" in command]
        os.kill(worker, signal.SIGKILL)
        _wait_for(lambda: "the ClientApp worker exited with code -9; starting another" in client_log.read_text(),
                  30, "the worker was not restarted")
        (second,) = _run(app, tmp_path, env, "second")
        assert second["replies"] == 0 and second["errors"] == [reason] and not trace.exists()
        assert client.poll() is None

        node = _children(client.pid)
        os.kill(client.pid, signal.SIGTERM)  # only `fedtune client`: its SuperNode and worker must not outlive it
        client.wait(timeout=30)
        _wait_for(lambda: not any(_alive(pid) for pid in node), 10, f"left behind: {node}")
    finally:
        for process in (client, superlink):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # nothing left of it
                pass
            process.wait(timeout=30)


def test_folders_named_like_the_apps_components_cannot_stand_in_for_the_nodes_code(tmp_path: Path) -> None:
    # Folders named server/ and client/ ahead of fedtune on the path: the worker imports only
    # fedtune's own modules, so neither is ever imported.
    for name in ("server", "client"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise SystemExit('imported the impostor')\n")
    probe = ("from fedtune.worker import load_local_app; import sys; from fedtune.client.app import app; "
             "loaded, _ = load_local_app(); assert loaded is app; "
             "assert 'server' not in sys.modules and 'client' not in sys.modules; print('own code')")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    worker = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert worker.stdout.strip() == "own code"
