"""No process of a run outlives the command that started it, however that command ended.

Ray (simulation) and Flower (server, client) start helper processes, several of them in sessions of
their own: Flower's SuperExec and app processes (flwr/supercore/utils.py, `get_popen_detach_kwargs`),
Ray's GCS, raylet, agents and workers. A process-group kill misses them, and Linux's parent-death
signal reaches direct children only. After `kill -9` of `fedtune simulate`, two Ray agents (about
210 MB) stayed behind and ignored SIGTERM.

`hold()` marks this process's environment with a random token, which every process it starts
inherits (Ray's and Flower's helpers included), and starts a small watchdog in a session of its own.
While this process lives, the watchdog notes its descendants every second (a process whose parent
dies is handed to init, out of the tree). Once this process is gone (a pipe whose write end only it
holds reaches end-of-file, or the watchdog is handed to another parent), the watchdog stops
(SIGSTOP) every process it noted that is still alive, every process whose environment carries the
token, and every descendant of those, until no new one turns up, then kills them all (SIGKILL).
Processes are told apart by descent and by the token (128 random bits, new for every command),
never by name; a noted pid counts only with its original start time, so a reused pid is spared.
Linux only (it reads /proc); elsewhere `hold()` does nothing.

    python -m fedtune.lifeline --token TOKEN --fd FD --parent-pid PID   (started by `hold()`)
"""

from __future__ import annotations

import argparse
import os
import secrets
import select
import signal
import subprocess
import sys
from pathlib import Path

from fedtune.logs import VERBOSITY_ENV, Verbosity

TOKEN_VARIABLE = "FEDTUNE_RUN_TOKEN"
_PROC = Path("/proc")
# How often the watchdog looks at the watched process's descendants (reading /proc/*/stat: a few
# ms), and checks that its parent is still the one it watches.
_LOOK_SECONDS = 1.0
_MAX_SWEEPS = 20  # rounds of "stop what carries the token or descends from it" before the kill

_write_end: int | None = None  # held open for the life of this process, never written to


def hold() -> None:
    """Tie every process this one starts from now on to its life (idempotent)."""
    global _write_end
    if _write_end is not None or not (_PROC / "self" / "environ").exists():
        return
    token = secrets.token_hex(16)
    read_end, write_end = os.pipe()  # not inherited by the processes started later (PEP 446)
    environment = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}  # the watchdog spares itself
    subprocess.Popen(
        [sys.executable, "-m", "fedtune.lifeline", "--token", token, "--fd", str(read_end),
         "--parent-pid", str(os.getpid())],
        pass_fds=(read_end,), start_new_session=True, stdin=subprocess.DEVNULL, env=environment,
    )
    os.close(read_end)
    os.environ[TOKEN_VARIABLE] = token
    _write_end = write_end


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # gone meanwhile, or not ours to read
        return b""


def _table() -> dict[int, tuple[int, int]]:
    """Every process now: pid -> (parent pid, start time in clock ticks since boot)."""
    table = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            stat = _read(entry / "stat")
            # "pid (command) state ppid ...": the command may hold spaces and parentheses, so split after the last ")".
            fields = stat[stat.rfind(b")") + 2:].split()
            if len(fields) > 19:
                table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, frontier = set(), list(roots)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _carrying(token: str, table: dict[int, tuple[int, int]]) -> set[int]:
    # A process that rewrote its title over its environment (Ray's agents do, with setproctitle)
    # no longer shows the token here: those are found by descent instead.
    mark = f"{TOKEN_VARIABLE}={token}".encode()
    return {pid for pid in table if mark in _read(_PROC / str(pid) / "environ").split(b"\0")}


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class _Run:
    """The processes of the watched command's run: seen as its descendants, or carrying its token."""

    def __init__(self, token: str, parent_pid: int) -> None:
        self.token, self.parent_pid = token, parent_pid
        self.seen: dict[int, int] = {}  # pid -> start time, so that a reused pid is never taken for one of them

    def look(self) -> None:
        """Remember the descendants of the watched process: a descendant whose parent dies is handed
        to init, and the run's tree no longer leads to it."""
        table = _table()
        for pid in _descendants({self.parent_pid}, table) - {os.getpid()}:
            self.seen[pid] = table[pid][1]

    def end(self) -> list[int]:
        """Stop, then kill, every process of the run still alive; returns their pids."""
        stopped: set[int] = set()
        for _ in range(_MAX_SWEEPS):
            # Stopped first, so that none can start another process between two looks.
            table = _table()
            seen = {pid for pid, start in self.seen.items() if table.get(pid, (0, None))[1] == start}
            found = _carrying(self.token, table) | seen
            new = (found | _descendants(found | stopped, table)) - stopped - {os.getpid()}
            if not new:
                break
            for pid in new:
                _signal(pid, signal.SIGSTOP)
            stopped |= new
        for pid in stopped:
            _signal(pid, signal.SIGKILL)
        return sorted(stopped)


def _watch(run: _Run, read_end: int) -> None:
    """Return once the watched process is gone, looking at its descendants meanwhile."""
    while os.getppid() == run.parent_pid:
        run.look()
        ready, _, _ = select.select([read_end], [], [], _LOOK_SECONDS)
        if ready and not os.read(read_end, 1):
            return  # end of file: no process holds the write end any more


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedtune.lifeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--token", required=True)
    parser.add_argument("--fd", type=int, required=True, help="Read end of the pipe the watched process holds.")
    parser.add_argument("--parent-pid", type=int, required=True, help="The watched process.")
    args = parser.parse_args(argv)
    if len(args.token) != 32 or not all(c in "0123456789abcdef" for c in args.token):
        parser.error("--token must be 32 hex digits")
    run = _Run(args.token, args.parent_pid)
    _watch(run, args.fd)
    ended = run.end()
    # Routine after most simulations (Ray's workers still shutting down as the command returns), and
    # printed once the command is gone, after the shell's prompt: said only under `fedtune -v`.
    if ended and os.environ.get(VERBOSITY_ENV) == Verbosity.VERBOSE.value:
        print(f"fedtune: ended {len(ended)} process(es) left behind by the run (pids {', '.join(map(str, ended))})",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
