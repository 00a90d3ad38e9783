"""No process of a run survives it, however the command was ended; SIGTERM frees the server's port at once.

Processes are watched through /proc (Linux), by descent from the command the test started, never
by name. A zombie counts as gone: it holds no memory, no port, and runs nothing (here PID 1 does
not always reap the orphans it inherits).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from real_nodes import FEDTUNE, REPO, free_port, sets

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

QUICK = ["federation.num_clients=1", "federation.rounds=2", "train.unfreeze=[]", "data.image_size=32"]


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a live process, None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return None if fields[0] == b"Z" else (int(fields[1]), int(fields[19]), fields[0].decode())


def _tree(root: int) -> dict[int, int]:
    """The live descendants of `root`: pid -> start time (to tell a reused pid apart)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = stat
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, _) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def _survivors(processes: dict[int, int]) -> list[int]:
    return [pid for pid, start in processes.items() if (stat := _stat(pid)) is not None and stat[1] == start]


def _wait_until_gone(processes: dict[int, int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _survivors(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _kill_everything(processes: dict[int, int]) -> None:
    for pid in _survivors(processes):  # only if the test failed: leave nothing to the next one
        os.kill(pid, signal.SIGKILL)


def test_helpers_that_left_the_session_or_the_tree_end_with_their_command(tmp_path: Path) -> None:
    """Stand-ins for Ray's and Flower's helpers: one in a session of its own that ignores SIGTERM,
    one handed to init (its parent exited) with its environment emptied, so only descent finds it."""
    pids = tmp_path / "pids"
    command = textwrap.dedent(f"""
        import subprocess, sys, time
        from fedtune import lifeline
        lifeline.hold()
        stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        a = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
        orphan = ("import subprocess, sys, time; "
                  "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], env={{}}, "
                  "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
                  "print(c.pid, flush=True); time.sleep(2.5)")
        b = subprocess.run([sys.executable, "-c", orphan], capture_output=True, text=True)
        open({str(pids)!r}, "w").write(f"{{a.pid}} {{b.stdout.strip()}}")
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", command], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    helpers: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 60
        while not pids.exists():
            assert parent.poll() is None and time.monotonic() < deadline, "the helpers did not start"
            time.sleep(0.2)
        stubborn, orphan = (int(p) for p in pids.read_text().split())
        helpers = {pid: _stat(pid)[1] for pid in (stubborn, orphan)}  # type: ignore[index]
        assert _tree(parent.pid).keys() & helpers.keys() == {stubborn}  # the orphan is out of the tree already
        parent.kill()
        parent.wait()
        assert _wait_until_gone(helpers, timeout=5) == []
    finally:
        parent.kill()
        _kill_everything(helpers)


def test_a_simulation_killed_with_sigkill_leaves_no_process(tmp_path: Path) -> None:
    simulation = subprocess.Popen(
        [*FEDTUNE, "simulate", str(REPO / "configs/quickstart.yaml"),
         *sets(*QUICK, "federation.rounds=20", f"output.dir={tmp_path / 'runs'}")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    seen: dict[int, int] = {}
    try:
        # Ray is up once the tree is three levels deep (fedtune -> raylet -> its agents and workers).
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            seen |= (tree := _tree(simulation.pid))
            if any(_stat(pid) and _stat(pid)[0] in tree for pid in tree):  # type: ignore[index]
                break
            assert simulation.poll() is None, "the simulation ended before Ray started"
            time.sleep(0.5)
        time.sleep(3)  # the agents and the client actor start a little later
        seen |= _tree(simulation.pid)
        assert len(seen) >= 5, seen
        simulation.kill()
        simulation.wait()
        assert _wait_until_gone(seen, timeout=5) == []
    finally:
        _kill_everything(seen)


def test_a_server_stopped_with_sigterm_frees_its_port_at_once(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [*FEDTUNE, "server", str(REPO / "configs/quickstart.yaml"), "--host", "127.0.0.1", "--port", str(port),
             "--state-dir", str(tmp_path / "state"), *sets(*QUICK, f"output.dir={tmp_path / 'runs'}")],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
            stdout=output, stderr=subprocess.STDOUT,
        )
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 180
        while "fedtune: submitted run" not in log.read_text(errors="replace"):  # SuperLink, SuperExec, ServerApp up
            assert server.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        time.sleep(2)
        seen = _tree(server.pid)
        assert len(seen) >= 3, seen
        server.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        while True:
            # As the next server would bind it (uvicorn and Flower set SO_REUSEADDR too).
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                    break
                except OSError:
                    assert time.monotonic() - stopped < 5, "the port is still held 5 s after SIGTERM"
                    time.sleep(0.1)
        freed = time.monotonic() - stopped
        assert server.wait(timeout=30) == 128 + signal.SIGTERM
        assert _wait_until_gone(seen, timeout=5) == []
    finally:
        if server.poll() is None:
            server.kill()
        _kill_everything(seen)
    assert freed < 5
