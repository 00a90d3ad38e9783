"""A process and its descendants, read from /proc (Linux): CPU seconds spent and memory held.

A simulation is a tree of processes (the driver, Ray's daemons, one worker per actor); the
benchmarks measure the whole tree. Processes that end between two reads are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: str) -> list[str] | None:
    try:
        # the command name (field 2) may hold spaces: the fields after it start behind its ')'
        return (Path("/proc") / pid / "stat").read_text().rpartition(")")[2].split()
    except OSError:  # the process ended meanwhile
        return None


def _processes() -> dict[int, list[str]]:
    """Every live process: pid -> its /proc/<pid>/stat fields from field 3 on."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(entry.name)) is not None:
            found[int(entry.name)] = fields
    return found


def _tree(root: int, processes: dict[int, list[str]]) -> set[int]:
    parents = {pid: int(fields[1]) for pid, fields in processes.items()}  # field 4, ppid
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in tree}
        tree.update(frontier)
    return tree


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process `root` and every live descendant."""
    processes = _processes()
    # fields 14 and 15, utime and stime
    return sum((int(processes[pid][11]) + int(processes[pid][12])) / CLOCK_TICKS
               for pid in _tree(root, processes) if pid in processes)


def tree_pss_bytes(root: int) -> int:
    """Proportional set size of process `root` and every live descendant: memory they share
    (torch's libraries, Ray's object store) counts once in all, split between them."""
    total = 0
    for pid in _tree(root, _processes()):
        try:
            rollup = (Path("/proc") / str(pid) / "smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024  # kB
                break
    return total
