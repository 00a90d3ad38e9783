"""How long `fedtune --help` takes to answer: the median wall time of several runs.

    python benchmarks/cli_startup.py              # 9 runs, a few seconds
    python benchmarks/cli_startup.py --runs 21

Each run is a fresh `python -m fedtune --help` (what the `fedtune` script runs), timed from start
to exit. A bare `python -c pass` is timed the same way beside it, so the figure can be read apart
from the interpreter's own start on the machine at hand. The target (issue 10) is under 0.5 s;
it holds while fedtune.cli imports neither torch nor Flower (tests/test_console.py checks that).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time


def timed_runs(command: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) seconds of `command`, once per run; a failed run stops the benchmark.

    CPU time is printed too: on a machine busy with other work the wall time includes waiting for
    a core, the CPU time does not.
    """
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="Runs of each command (default 9).")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    commands = {
        "fedtune --help": [sys.executable, "-m", "fedtune", "--help"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }
    timed_runs(commands["fedtune --help"], 1)  # warm the file cache and the bytecode
    for label, command in commands.items():
        walls, cpus = timed_runs(command, args.runs)
        print(f"{label}: median {statistics.median(walls):.3f} s wall over {args.runs} runs "
              f"(min {min(walls):.3f} s, max {max(walls):.3f} s); median CPU {statistics.median(cpus):.3f} s",
              flush=True)


if __name__ == "__main__":
    main()
