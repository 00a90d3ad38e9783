"""`fedtune simulate` as benchmarks run it: one experiment per folder, in a process of its own, reused
once it has finished (a benchmark interrupted halfway picks up where it stopped)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def finished_run(folder: Path) -> Path | None:
    """The latest run directory under `folder` with a summary.json, if any."""
    runs = sorted(p for p in folder.iterdir() if (p / "summary.json").is_file()) if folder.is_dir() else []
    return runs[-1] if runs else None


def simulated_run(config: Path, folder: Path, overrides: list[str], *, fresh_caches: bool = False) -> Path:
    """The run directory of `fedtune simulate config --set ...` under `folder`: the finished one there, or a new one.

    With `fresh_caches`, the nodes start with empty caches (FEDTUNE_CACHE_DIR under `folder`): the run
    sends its backbone and computes its frozen features once, as on new nodes.
    """
    done = finished_run(folder)
    if done is not None:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "fedtune", "-q", "simulate", str(config), "--set", f"output.dir={folder}"]
    for item in overrides:
        command += ["--set", item]
    print("$", " ".join(command), flush=True)
    env = {**os.environ, "FEDTUNE_CACHE_DIR": str(folder / "node-caches")} if fresh_caches else None
    subprocess.run(command, check=True, stdout=sys.stderr, env=env)
    run = finished_run(folder)
    if run is None:
        raise RuntimeError(f"{folder}: fedtune simulate finished without a summary.json")
    return run
