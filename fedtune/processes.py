"""Flower's daemons as fedtune's child processes: started in groups of their own, stopped whole, restarted."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

# A worker that keeps dying (say, it cannot import torch) is restarted no more often than this.
WORKER_RESTART_INTERVAL = 5.0
# How long a Flower daemon gets after SIGTERM before SIGKILL: the SuperLink's web server would
# otherwise wait for its open connections (35-80 s were seen).
STOP_GRACE = 3.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_SETTLED = 60.0  # seconds a SuperNode has run when its exit is no longer part of a failing start


class NodeError(RuntimeError):
    """A node cannot start as asked; the message says what to change."""


def flower_env(**extra: str) -> dict[str, str]:
    """The environment for Flower's processes: they start further Flower commands (flwr-serverapp,
    flower-superexec) by name, so the directory of this Python's CLIs goes first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **extra}


def executable(name: str) -> str:
    # The CLIs installed beside this Python, whether or not its environment is activated.
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise NodeError(f"{name} not found: install fedtune's dependencies (flwr) into this environment")
    return found


def _die_with_parent() -> None:
    """Run in the child before exec: Linux sends it SIGTERM when fedtune's process dies, even by
    kill -9, so a SuperLink or SuperNode never outlives the command that started it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_daemon(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a Flower daemon in a process group of its own, tied to this process's life.

    Flower's daemons start helpers (SuperExec, ServerApp, ClientApp processes) that can outlive
    them; the group lets `stop_daemons` end those that stay in it, fedtune/lifeline.py the others (the
    SuperExec starts a session of its own).
    """
    on_linux = sys.platform.startswith("linux")
    return subprocess.Popen(command, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent if on_linux else None)


def stop_daemons(*processes: subprocess.Popen) -> None:
    """Stop daemons started by `start_daemon`, each with every process of its group, all at once (what
    left their groups: fedtune/lifeline.py)."""
    deadline = time.monotonic() + STOP_GRACE
    for process in processes:
        signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        signal_group(process, signal.SIGKILL)  # the daemon if it is still there, and helpers that ignored SIGTERM
        process.wait()


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Send `signum` to the process group (or session) that `process` leads; nothing if it is gone."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # nothing left of it
        pass


@contextlib.contextmanager
def sigterm_ends_the_command() -> Iterator[None]:
    """SIGTERM (`docker stop`, `kill`) unwinds like Ctrl-C: the port is closed and the daemons are
    stopped on the way out, where Python's default would end the process on the spot."""
    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Worker:
    """fedtune's ClientApp worker beside a SuperNode started with `--isolation process`.

    Started again whenever it exits (an app that crashed the process, say), at most once per
    WORKER_RESTART_INTERVAL; it waits for the SuperNode's Runtime API by itself, also across a
    restart of the SuperNode.
    """

    def __init__(self, command: list[str]) -> None:
        self._command = command
        self._process: subprocess.Popen | None = None
        self._started = 0.0

    def keep_alive(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        if self._process is not None:
            stop_daemons(self._process)  # anything it started
            if time.monotonic() < self._started + WORKER_RESTART_INTERVAL:
                return  # not yet: the next call starts it
            print(f"fedtune: the ClientApp worker exited with code {self._process.returncode}; starting another",
                  file=sys.stderr, flush=True)
        self._started = time.monotonic()
        self._process = start_daemon(self._command, flower_env())

    def running(self) -> list[subprocess.Popen]:
        return [self._process] if self._process is not None else []


def supervise(command: list[str], give_up_after: float, *, worker: Worker, retry_every: float = 5.0) -> int:
    """Run the SuperNode until this process is stopped, starting it again whenever it ends.

    Flower's SuperNode retries a server that is down, but it exits when the server refuses it: a
    server with node authentication before it has registered the node's key, or a restarted
    server that no longer knows the node. After `give_up_after` s of such exits in a row, stop.
    The `worker` is kept running meanwhile, and stopped with the SuperNode when this ends.
    """
    failing_since: float | None = None
    while True:
        started = time.monotonic()
        process = start_daemon(command, flower_env())
        try:
            while (code := process.poll()) is None:
                worker.keep_alive()
                time.sleep(0.5)
        except BaseException:  # stopped (Ctrl-C, SIGTERM): both at once, not one grace period after the other
            stop_daemons(process, *worker.running())
            raise
        stop_daemons(process)
        if time.monotonic() - started > _SETTLED:
            failing_since = None  # it had been running: this is a new failure, not one more of a streak
        failing_since = failing_since if failing_since is not None else started
        if time.monotonic() - failing_since >= give_up_after:
            stop_daemons(*worker.running())
            print(f"error: the SuperNode stopped (exit code {code}); if its log says 'Failed to activate SuperNode', "
                  "the server accepts only known nodes: start this node with --auth-key and have the server's "
                  "operator add its public key to --authorized-keys", file=sys.stderr)
            return code or 1
        print(f"the SuperNode stopped (exit code {code}); starting it again in {retry_every:.0f} s", file=sys.stderr)
        time.sleep(retry_every)
